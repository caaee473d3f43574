namespace ISCSISnap.Target.Scsi;

/// <summary>SAM-5 status codes.</summary>
public enum ScsiStatus : byte
{
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    AcaActive = 0x30,
    TaskAborted = 0x40,
}

/// <summary>SPC-4 sense keys.</summary>
public enum SenseKey : byte
{
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    CopyAborted = 0xA,
    AbortedCommand = 0xB,
    VolumeOverflow = 0xD,
    Miscompare = 0xE,
}

/// <summary>SAM task attributes as iSCSI carries them (ATTR field).</summary>
public enum TaskAttribute : byte
{
    Untagged = 0,
    Simple = 1,
    Ordered = 2,
    HeadOfQueue = 3,
    Aca = 4,
}

/// <summary>An additional sense code and qualifier pair with its sense key: the status code of the storage boundary.</summary>
public readonly record struct SenseCode(SenseKey Key, byte Asc, byte Ascq)
{
    public ushort AscAscq => (ushort)((Asc << 8) | Ascq);
    public override string ToString() => $"{Key} {Asc:X2}h/{Ascq:X2}h";

    // ILLEGAL REQUEST
    public static readonly SenseCode InvalidOpcode = new(SenseKey.IllegalRequest, 0x20, 0x00);
    public static readonly SenseCode LbaOutOfRange = new(SenseKey.IllegalRequest, 0x21, 0x00);
    public static readonly SenseCode InvalidFieldInCdb = new(SenseKey.IllegalRequest, 0x24, 0x00);
    public static readonly SenseCode LunNotSupported = new(SenseKey.IllegalRequest, 0x25, 0x00);
    public static readonly SenseCode InvalidFieldInParameterList = new(SenseKey.IllegalRequest, 0x26, 0x00);
    public static readonly SenseCode ParameterListLengthError = new(SenseKey.IllegalRequest, 0x1A, 0x00);
    public static readonly SenseCode SavingParametersNotSupported = new(SenseKey.IllegalRequest, 0x39, 0x00);
    public static readonly SenseCode InvalidReleaseOfPersistentReservation = new(SenseKey.IllegalRequest, 0x26, 0x04);
    public static readonly SenseCode InsufficientRegistrationResources = new(SenseKey.IllegalRequest, 0x55, 0x04);
    public static readonly SenseCode InvalidCommandOperationCode = InvalidOpcode;
    public static readonly SenseCode MediumRemovalPrevented = new(SenseKey.IllegalRequest, 0x53, 0x02);
    public static readonly SenseCode TooManyTargetDescriptors = new(SenseKey.IllegalRequest, 0x26, 0x06);
    public static readonly SenseCode UnsupportedTargetDescriptorType = new(SenseKey.IllegalRequest, 0x26, 0x07);
    public static readonly SenseCode TooManySegmentDescriptors = new(SenseKey.IllegalRequest, 0x26, 0x08);
    public static readonly SenseCode UnsupportedSegmentDescriptorType = new(SenseKey.IllegalRequest, 0x26, 0x09);
    public static readonly SenseCode OperationInProgress = new(SenseKey.IllegalRequest, 0x00, 0x16);
    public static readonly SenseCode InvalidMessageError = new(SenseKey.IllegalRequest, 0x49, 0x00);
    /// <summary>The Data-Out did not match what the CDB describes (too short, or ending inside a block).</summary>
    public static readonly SenseCode InvalidFieldInInformationUnit = new(SenseKey.IllegalRequest, 0x0E, 0x03);

    // UNIT ATTENTION
    public static readonly SenseCode PowerOnResetOccurred = new(SenseKey.UnitAttention, 0x29, 0x00);
    public static readonly SenseCode PowerOnOccurred = new(SenseKey.UnitAttention, 0x29, 0x01);
    public static readonly SenseCode BusResetOccurred = new(SenseKey.UnitAttention, 0x29, 0x02);
    public static readonly SenseCode BusDeviceResetOccurred = new(SenseKey.UnitAttention, 0x29, 0x03);
    public static readonly SenseCode ItNexusLossOccurred = new(SenseKey.UnitAttention, 0x29, 0x07);
    public static readonly SenseCode ModeParametersChanged = new(SenseKey.UnitAttention, 0x2A, 0x01);
    public static readonly SenseCode ReservationsPreempted = new(SenseKey.UnitAttention, 0x2A, 0x03);
    public static readonly SenseCode ReservationsReleased = new(SenseKey.UnitAttention, 0x2A, 0x04);
    public static readonly SenseCode RegistrationsPreempted = new(SenseKey.UnitAttention, 0x2A, 0x05);
    public static readonly SenseCode CapacityDataChanged = new(SenseKey.UnitAttention, 0x2A, 0x09);
    public static readonly SenseCode MediumMayHaveChanged = new(SenseKey.UnitAttention, 0x28, 0x00);
    public static readonly SenseCode CommandsClearedByAnotherInitiator = new(SenseKey.UnitAttention, 0x2F, 0x00);
    public static readonly SenseCode CommandsClearedByPowerLoss = new(SenseKey.UnitAttention, 0x2F, 0x02);
    public static readonly SenseCode ReportedLunsDataChanged = new(SenseKey.UnitAttention, 0x3F, 0x0E);
    public static readonly SenseCode InquiryDataChanged = new(SenseKey.UnitAttention, 0x3F, 0x03);

    // NOT READY
    public static readonly SenseCode NotReadyCauseNotReportable = new(SenseKey.NotReady, 0x04, 0x00);
    public static readonly SenseCode NotReadyManualIntervention = new(SenseKey.NotReady, 0x04, 0x03);
    public static readonly SenseCode NotReadyStoppedState = new(SenseKey.NotReady, 0x04, 0x02);
    public static readonly SenseCode MediumNotPresent = new(SenseKey.NotReady, 0x3A, 0x00);

    // MEDIUM / HARDWARE
    public static readonly SenseCode UnrecoveredReadError = new(SenseKey.MediumError, 0x11, 0x00);
    public static readonly SenseCode WriteError = new(SenseKey.MediumError, 0x0C, 0x00);
    public static readonly SenseCode SpaceAllocationFailedWriteProtect = new(SenseKey.DataProtect, 0x27, 0x07);
    public static readonly SenseCode WriteProtected = new(SenseKey.DataProtect, 0x27, 0x00);
    public static readonly SenseCode InternalTargetFailure = new(SenseKey.HardwareError, 0x44, 0x00);
    public static readonly SenseCode MiscompareDuringVerify = new(SenseKey.Miscompare, 0x1D, 0x00);

    // ABORTED COMMAND
    public static readonly SenseCode ProtocolServiceCrcError = new(SenseKey.AbortedCommand, 0x47, 0x05);
    public static readonly SenseCode DataPhaseError = new(SenseKey.AbortedCommand, 0x4B, 0x00);
    public static readonly SenseCode CommandPhaseError = new(SenseKey.AbortedCommand, 0x4A, 0x00);
    public static readonly SenseCode UnreachableCopyTarget = new(SenseKey.CopyAborted, 0x08, 0x04);
    public static readonly SenseCode CopyTargetDeviceNotReachable = new(SenseKey.CopyAborted, 0x0D, 0x02);
}
