namespace ISCSISnap.Target.Iscsi.Pdus;

/// <summary>iSCSI opcodes (RFC 7143 §11.1.1).</summary>
public enum Opcode : byte
{
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskManagementRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    ScsiDataOut = 0x05,
    LogoutRequest = 0x06,
    Snack = 0x10,

    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskManagementResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    ScsiDataIn = 0x25,
    LogoutResponse = 0x26,
    ReadyToTransfer = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

/// <summary>Reject reasons (RFC 7143 §11.17.1).</summary>
public enum RejectReason : byte
{
    DataDigestError = 0x02,
    SnackReject = 0x03,
    ProtocolError = 0x04,
    CommandNotSupported = 0x05,
    ImmediateCommandRejected = 0x06,
    TaskInProgress = 0x07,
    InvalidDataAck = 0x08,
    InvalidPduField = 0x09,
    OutOfResources = 0x0a,
    WaitingForLogout = 0x0c,
}

/// <summary>Task management functions (RFC 7143 §11.5.1).</summary>
public enum TaskManagementFunction : byte
{
    AbortTask = 1,
    AbortTaskSet = 2,
    ClearAca = 3,
    ClearTaskSet = 4,
    LogicalUnitReset = 5,
    TargetWarmReset = 6,
    TargetColdReset = 7,
    TaskReassign = 8,
}

/// <summary>Task management responses (RFC 7143 §11.6.1).</summary>
public enum TaskManagementResponse : byte
{
    FunctionComplete = 0,
    TaskDoesNotExist = 1,
    LunDoesNotExist = 2,
    TaskStillAllegiant = 3,
    TaskAllegianceReassignmentNotSupported = 4,
    NotSupported = 5,
    AuthorizationFailed = 6,
    FunctionRejected = 255,
}

/// <summary>Login response status (class, detail) pairs (RFC 7143 §11.13.5).</summary>
public static class LoginStatus
{
    public const ushort Success = 0x0000;
    public const ushort TargetMovedTemporarily = 0x0101;
    public const ushort TargetMovedPermanently = 0x0102;
    public const ushort InitiatorError = 0x0200;
    public const ushort AuthenticationFailure = 0x0201;
    public const ushort AuthorizationFailure = 0x0202;
    public const ushort NotFound = 0x0203;
    public const ushort TargetRemoved = 0x0204;
    public const ushort UnsupportedVersion = 0x0205;
    public const ushort TooManyConnections = 0x0206;
    public const ushort MissingParameter = 0x0207;
    public const ushort CannotIncludeInSession = 0x0208;
    public const ushort SessionTypeNotSupported = 0x0209;
    public const ushort SessionDoesNotExist = 0x020a;
    public const ushort InvalidDuringLogin = 0x020b;
    public const ushort TargetError = 0x0300;
    public const ushort ServiceUnavailable = 0x0301;
    public const ushort OutOfResources = 0x0302;
}
