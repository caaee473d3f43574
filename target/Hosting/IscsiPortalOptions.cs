using System.Net;

namespace ISCSISnap.Target.Hosting;

/// <summary>CHAP user name and secret.</summary>
public sealed record ChapCredentials(string UserName, string Secret)
{
    public const int MinimumSecretLength = 12;
    public const int MaximumSecretLength = 255;

    /// <summary>Problems with these credentials, prefixed by <paramref name="field"/>; empty when valid.</summary>
    public IEnumerable<string> Validate(string field)
    {
        if (string.IsNullOrWhiteSpace(UserName) || UserName.Length > 255)
            yield return $"{field}.userName must be 1-255 characters";
        if (Secret is null || Secret.Length < MinimumSecretLength || Secret.Length > MaximumSecretLength)
            yield return $"{field}.secret must be {MinimumSecretLength}-{MaximumSecretLength} characters (RFC 7143 asks for at least 96 bits)";
    }

    // Keep secrets out of logs and exception messages.
    public override string ToString() => $"ChapCredentials {{ UserName = {UserName}, Secret = *** }}";
}

/// <summary>
/// Settings of the iSCSI service: where it listens and what it offers in negotiation.
/// Validated once at start (<see cref="Validate"/>); immutable while the portal runs.
/// </summary>
public sealed class IscsiPortalOptions
{
    public string Portal { get; set; } = "0.0.0.0:3260";
    public ushort PortalGroupTag { get; set; } = 1;

    public int MaxRecvDataSegmentLength { get; set; } = 262144;
    public int MaxBurstLength { get; set; } = 1048576;
    public int FirstBurstLength { get; set; } = 262144;
    public bool InitialR2T { get; set; }
    public bool ImmediateData { get; set; } = true;
    public int MaxOutstandingR2T { get; set; } = 4;
    public int MaxConnections { get; set; } = 1;
    public int DefaultTime2Wait { get; set; } = 2;
    public int DefaultTime2Retain { get; set; } = 0;
    /// <summary>Commands in flight per session (the CmdSN window).</summary>
    public int QueueDepth { get; set; } = 128;
    /// <summary>Digests offered, in the target's order of preference: "CRC32C", "None".</summary>
    public List<string> HeaderDigests { get; set; } = ["None", "CRC32C"];
    public List<string> DataDigests { get; set; } = ["None", "CRC32C"];
    /// <summary>CHAP algorithms accepted, strongest first among those the initiator offers: SHA3-256, SHA-256, SHA-1, MD5.</summary>
    public List<string> ChapAlgorithms { get; set; } = ["SHA3-256", "SHA-256", "SHA-1", "MD5"];
    /// <summary>Optional CHAP for discovery sessions.</summary>
    public ChapCredentials? DiscoveryChap { get; set; }

    public int NopInIntervalSeconds { get; set; } = 15;
    public int NopInTimeoutSeconds { get; set; } = 30;
    public int LoginTimeoutSeconds { get; set; } = 15;
    /// <summary>How long a connection the target closes after a final PDU waits for the initiator to close its side.</summary>
    public int CloseWaitMilliseconds { get; set; } = 5000;
    public int MaxSessions { get; set; } = 256;
    /// <summary>Largest single READ/WRITE transfer (VPD B0 MAXIMUM TRANSFER LENGTH), bytes.</summary>
    public int MaxTransferBytes { get; set; } = 32 << 20;

    public IPEndPoint ParsePortal() => ParseEndPoint(Portal) ?? throw new FormatException($"portal '{Portal}' is not HOST:PORT");

    public static IPEndPoint? ParseEndPoint(string text)
    {
        if (IPEndPoint.TryParse(text, out var endPoint)) return endPoint;   // port 0: any free port (tests)
        return null;
    }

    /// <summary>Every problem, each naming its field; empty when the options are usable.</summary>
    public List<string> Validate(string prefix = "iscsi")
    {
        var errors = new List<string>();
        if (ParseEndPoint(Portal) is null) errors.Add($"{prefix}.portal '{Portal}' is not HOST:PORT with a numeric address");
        if (PortalGroupTag == 0) errors.Add($"{prefix}.portalGroupTag must be 1-65535");
        CheckRange(errors, $"{prefix}.maxRecvDataSegmentLength", MaxRecvDataSegmentLength, 512, 16777215);
        CheckRange(errors, $"{prefix}.maxBurstLength", MaxBurstLength, 512, 16777215);
        CheckRange(errors, $"{prefix}.firstBurstLength", FirstBurstLength, 512, 16777215);
        if (FirstBurstLength > MaxBurstLength) errors.Add($"{prefix}.firstBurstLength must not exceed maxBurstLength");
        CheckRange(errors, $"{prefix}.maxOutstandingR2T", MaxOutstandingR2T, 1, 16);
        CheckRange(errors, $"{prefix}.maxConnections", MaxConnections, 1, 1);
        CheckRange(errors, $"{prefix}.defaultTime2Wait", DefaultTime2Wait, 0, 3600);
        CheckRange(errors, $"{prefix}.defaultTime2Retain", DefaultTime2Retain, 0, 3600);
        CheckRange(errors, $"{prefix}.queueDepth", QueueDepth, 1, 1024);
        CheckRange(errors, $"{prefix}.nopInIntervalSeconds", NopInIntervalSeconds, 0, 3600);
        CheckRange(errors, $"{prefix}.nopInTimeoutSeconds", NopInTimeoutSeconds, 1, 3600);
        CheckRange(errors, $"{prefix}.loginTimeoutSeconds", LoginTimeoutSeconds, 1, 3600);
        CheckRange(errors, $"{prefix}.closeWaitMilliseconds", CloseWaitMilliseconds, 10, 60000);
        CheckRange(errors, $"{prefix}.maxSessions", MaxSessions, 1, 65535);
        CheckRange(errors, $"{prefix}.maxTransferBytes", MaxTransferBytes, 65536, 32 << 20);
        if (MaxTransferBytes % 4096 != 0) errors.Add($"{prefix}.maxTransferBytes must be a multiple of 4096");
        CheckDigests(errors, $"{prefix}.headerDigests", HeaderDigests);
        CheckDigests(errors, $"{prefix}.dataDigests", DataDigests);
        if (ChapAlgorithms.Count == 0) errors.Add($"{prefix}.chapAlgorithms must name at least one algorithm");
        foreach (var name in ChapAlgorithms)
            if (Iscsi.Login.ChapAlgorithm.FromName(name) is null)
                errors.Add($"{prefix}.chapAlgorithms: unknown algorithm '{name}' (use SHA3-256, SHA-256, SHA-1 or MD5)");
        if (DiscoveryChap is not null) errors.AddRange(DiscoveryChap.Validate($"{prefix}.discoveryChap"));
        return errors;
    }

    private static void CheckRange(List<string> errors, string field, int value, int min, int max)
    {
        if (value < min || value > max) errors.Add($"{field} is {value}; it must be {min}-{max}");
    }

    private static void CheckDigests(List<string> errors, string field, List<string> digests)
    {
        if (digests.Count == 0) errors.Add($"{field} must name at least one of CRC32C, None");
        foreach (var d in digests)
            if (d is not ("CRC32C" or "None")) errors.Add($"{field}: '{d}' is not CRC32C or None");
    }
}
