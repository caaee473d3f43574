namespace ISCSISnap.Target.Iscsi.Sessions;

/// <summary>
/// Operational parameters in force for a session and its connection (RFC 7143 §13), with their defaults.
/// Set during login; read-only afterwards (MaxRecvDataSegmentLength may be redeclared in full feature phase).
/// </summary>
public sealed class NegotiatedParameters
{
    // Connection-scoped.
    public bool HeaderDigest { get; set; }
    public bool DataDigest { get; set; }
    /// <summary>The largest data segment the initiator accepts: our Data-In, Text and NOP-In payload limit.</summary>
    public int InitiatorMaxRecvDataSegmentLength { get; set; } = 8192;
    /// <summary>The largest data segment we accept (declared by us).</summary>
    public int TargetMaxRecvDataSegmentLength { get; set; } = 8192;

    // Session-scoped (leading connection only).
    public int MaxConnections { get; set; } = 1;
    public bool InitialR2T { get; set; } = true;
    public bool ImmediateData { get; set; } = true;
    public int MaxBurstLength { get; set; } = 262144;
    public int FirstBurstLength { get; set; } = 65536;
    public int DefaultTime2Wait { get; set; } = 2;
    public int DefaultTime2Retain { get; set; } = 20;
    public int MaxOutstandingR2T { get; set; } = 1;
    public bool DataPduInOrder { get; set; } = true;
    public bool DataSequenceInOrder { get; set; } = true;
    public int ErrorRecoveryLevel { get; set; }

    public NegotiatedParameters CloneSessionScope() => (NegotiatedParameters)MemberwiseClone();
}
