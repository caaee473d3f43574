using System.Buffers.Binary;
using System.Net.Sockets;
using ISCSISnap.Storage.Sharing;

namespace ISCSISnap.SharingPeer;

/// <summary>
/// <c>ISCSISnap.SharingPeer SOCKET-PATH</c>: connects to the owner listening on SOCKET-PATH, takes its regions, then
/// serves <see cref="PeerCommand"/>s until told to exit or the socket closes. A refused hand-over prints the
/// refusal and exits with <see cref="PeerProtocol.RefusedExitCode"/>.
/// </summary>
public static class Program
{
    public static async Task<int> Main(string[] args)
    {
        if (args.Length != 1)
        {
            Console.Error.WriteLine("usage: ISCSISnap.SharingPeer SOCKET-PATH");
            return 2;
        }
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await socket.ConnectAsync(new UnixDomainSocketEndPoint(args[0]));

        PeerLink link;
        try
        {
            link = await PeerLink.AcceptAsync(socket, new ExpectedPeer(null, PeerCredentials.Current.Uid), null, null, keepDescriptors: true, default);
        }
        catch (SharingException e)
        {
            Console.WriteLine($"refused: {e.Check}: {e.Message}");
            return PeerProtocol.RefusedExitCode;
        }
        using (link)
            return await ServeAsync(socket, link);
    }

    private static async Task<int> ServeAsync(Socket socket, PeerLink link)
    {
        var command = new byte[PeerProtocol.CommandBytes];
        var own = new byte[16 << 20];   // the peer's private memory, where moved data lands
        while (true)
        {
            if (!await ReadExactlyAsync(socket, command)) return 0;
            var op = (PeerCommand)command[0];
            var handle = SharedHandle.ReadFrom(command.AsSpan(1));
            var rights = (HandleRights)command[17];
            long offset = BinaryPrimitives.ReadInt64LittleEndian(command.AsSpan(18));
            int length = BinaryPrimitives.ReadInt32LittleEndian(command.AsSpan(26));
            byte argument = command[30];

            byte status = 0;
            int value = 0;
            byte[] payload = [];
            switch (op)
            {
                case PeerCommand.Read:
                    if (Resolve(link, handle, rights, offset, length, out var readable, out var readRefusal)) payload = readable.ToArray();
                    status = (byte)readRefusal;
                    break;
                case PeerCommand.Write:
                    if (Resolve(link, handle, rights, offset, length, out var writable, out var writeRefusal)) writable.Fill(argument);
                    status = (byte)writeRefusal;
                    break;
                case PeerCommand.CopyOut:
                    if (link.TryResolve(handle, HandleRights.Read, out var source, out var copyRefusal)) source.CopyTo(own);
                    status = (byte)copyRefusal;
                    break;
                case PeerCommand.ReceiveBytes:
                    if (!await ReadExactlyAsync(socket, own.AsMemory(0, length))) return 0;
                    break;
                case PeerCommand.MapWritable:
                    value = MapWritable(link, argument);
                    break;
                case PeerCommand.ProtectWritable:
                    value = ProtectWritable(link, argument);
                    break;
                case PeerCommand.WriteDescriptor:
                    value = WriteDescriptor(link, argument);
                    break;
                case PeerCommand.Shrink:
                    value = SharingNative.FTruncate(link.Descriptor(argument), RegionBytes(link, argument) / 2) == 0 ? 0 : SharingNative.LastError;
                    break;
                case PeerCommand.Grow:
                    value = SharingNative.FTruncate(link.Descriptor(argument), RegionBytes(link, argument) * 2) == 0 ? 0 : SharingNative.LastError;
                    break;
                case PeerCommand.PunchHole:
                    value = SharingNative.FAllocate(link.Descriptor(argument), 0x3 /* PUNCH_HOLE | KEEP_SIZE */, 0, 4096) == 0 ? 0 : SharingNative.LastError;
                    break;
                case PeerCommand.ReopenWritable:
                    value = ReopenWritable(link, argument);
                    break;
                case PeerCommand.AddSeal:
                    value = SharingNative.Fcntl(link.Descriptor(argument), SharingNative.F_ADD_SEALS, SharingNative.F_SEAL_WRITE) == 0 ? 0 : SharingNative.LastError;
                    break;
                case PeerCommand.Stats:
                    value = Directory.GetFiles("/proc/self/fd").Length;
                    payload = new byte[12];
                    BinaryPrimitives.WriteInt32LittleEndian(payload, File.ReadLines("/proc/self/maps").Count(l => l.Contains("/memfd:iscsisnap-share")));
                    BinaryPrimitives.WriteInt64LittleEndian(payload.AsSpan(4), link.TotalRefusals);
                    break;
                case PeerCommand.Ping:
                    break;
                case PeerCommand.Exit:
                    await ReplyAsync(socket, 0, 0, []);
                    return 0;
                default:
                    status = 0xFF;
                    break;
            }
            await ReplyAsync(socket, status, value, payload);
        }
    }

    /// <summary>A negative length in a command asks for the handle's whole range.</summary>
    private static bool Resolve(PeerLink link, SharedHandle handle, HandleRights rights, long offset, int length, out Span<byte> memory, out SharingCheck refusal)
        => length < 0 && offset == 0
            ? link.TryResolve(handle, rights, out memory, out refusal)
            : link.TryResolve(handle, rights, offset, length, out memory, out refusal);

    /// <summary>Region index 0 is the handle table; 1..n are the link's regions.</summary>
    private static long RegionBytes(PeerLink link, int index) => index == 0 ? SharingNative.LSeek(link.Descriptor(0), 0, 2) : link.RegionLength(index - 1);

    private static unsafe int WriteDescriptor(PeerLink link, int index)
    {
        byte one = 0x5A;
        return SharingNative.PWrite(link.Descriptor(index), &one, 1, 0) == 1 ? 0 : SharingNative.LastError;
    }

    private static int MapWritable(PeerLink link, int index)
    {
        long length = RegionBytes(link, index);
        nint address = SharingNative.MMap(0, (nuint)length, 0x3, 0x1, link.Descriptor(index), 0);
        if (address == -1) return SharingNative.LastError;
        SharingNative.MUnmap(address, (nuint)length);
        return 0;
    }

    private static int ReopenWritable(PeerLink link, int index)
    {
        int fd = SharingNative.Open($"/proc/self/fd/{link.Descriptor(index)}", SharingNative.O_RDWR | SharingNative.O_CLOEXEC);
        if (fd < 0) return SharingNative.LastError;
        long length = RegionBytes(link, index);
        nint address = SharingNative.MMap(0, (nuint)length, SharingNative.PROT_READ | SharingNative.PROT_WRITE, SharingNative.MAP_SHARED, fd, 0);
        int result = address == SharingNative.MapFailed ? SharingNative.LastError : 0;
        if (result == 0) SharingNative.MUnmap(address, (nuint)length);
        SharingNative.Close(fd);
        return result;
    }

    private static int ProtectWritable(PeerLink link, int index)
    {
        long length = RegionBytes(link, index);
        nint address = SharingNative.MMap(0, (nuint)length, 0x1, 0x1, link.Descriptor(index), 0);
        if (address == -1) return -SharingNative.LastError;
        int result = SharingNative.MProtect(address, (nuint)length, 0x3) == 0 ? 0 : SharingNative.LastError;
        SharingNative.MUnmap(address, (nuint)length);
        return result;
    }

    private static async Task ReplyAsync(Socket socket, byte status, int value, byte[] payload)
    {
        var reply = new byte[PeerProtocol.ReplyHeaderBytes + payload.Length];
        reply[0] = status;
        BinaryPrimitives.WriteInt32LittleEndian(reply.AsSpan(1), value);
        BinaryPrimitives.WriteInt32LittleEndian(reply.AsSpan(5), payload.Length);
        payload.CopyTo(reply, PeerProtocol.ReplyHeaderBytes);
        await socket.SendAsync(reply, SocketFlags.None);
    }

    internal static async Task<bool> ReadExactlyAsync(Socket socket, Memory<byte> buffer)
    {
        int read = 0;
        while (read < buffer.Length)
        {
            int n = await socket.ReceiveAsync(buffer[read..], SocketFlags.None);
            if (n == 0) return false;
            read += n;
        }
        return true;
    }
}
