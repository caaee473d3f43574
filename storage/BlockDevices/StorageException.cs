namespace ISCSISnap.Storage.BlockDevices;

/// <summary>A storage object could not be opened or created; the message names the file and the fault.</summary>
public sealed class StorageException : Exception
{
    public StorageException(string path, string fault, Exception? inner = null)
        : base($"{path}: {fault}", inner)
    {
        Path = path;
        Fault = fault;
    }

    public string Path { get; }
    public string Fault { get; }
}
