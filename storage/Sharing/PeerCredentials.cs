using System.Buffers.Binary;
using System.Net.Sockets;

namespace ISCSISnap.Storage.Sharing;

/// <summary>The process a link expects at the other end of its socket; a null field is not checked.</summary>
public readonly record struct ExpectedPeer(int? Pid, uint? Uid)
{
    public bool Matches(PeerCredentials actual) => (Pid is null || Pid == actual.Pid) && (Uid is null || Uid == actual.Uid);

    public override string ToString() => $"pid {(Pid?.ToString() ?? "any")} uid {(Uid?.ToString() ?? "any")}";
}

/// <summary>The process at the other end of a Unix domain socket, as the kernel recorded it at connect (SO_PEERCRED).</summary>
public readonly record struct PeerCredentials(int Pid, uint Uid, uint Gid)
{
    public static PeerCredentials Of(Socket socket)
    {
        Span<byte> ucred = stackalloc byte[12];
        int length = socket.GetRawSocketOption(SharingNative.SOL_SOCKET, SharingNative.SO_PEERCRED, ucred);
        if (length < 12)
            throw new SharingException(SharingCheck.Credentials, "the socket reports no peer credentials (not a connected Unix domain socket)");
        return new PeerCredentials(
            BinaryPrimitives.ReadInt32LittleEndian(ucred),
            BinaryPrimitives.ReadUInt32LittleEndian(ucred[4..]),
            BinaryPrimitives.ReadUInt32LittleEndian(ucred[8..]));
    }

    /// <summary>This process, as a peer would see it.</summary>
    public static PeerCredentials Current => new(Environment.ProcessId, SharingNative.GetUid(), SharingNative.GetGid());


    public override string ToString() => $"pid {Pid} uid {Uid} gid {Gid}";
}
