using System.Buffers.Binary;
using System.Net.Sockets;
using ISCSISnap.Storage.Native;

namespace ISCSISnap.Storage.Sharing;

/// <summary>
/// The one message that hands a link's regions to its peer, and the peer's acknowledgement. The owner sends the
/// table's and regions' memfds with SCM_RIGHTS together with a small description of them:
/// <code>
/// offset 0  u32 magic "ISHM"   4 u16 version   6 u16 region count n (the table not counted)
///        8  u32 peer id       12 u32 handle table slots
///       16  n + 1 entries of 16 bytes, the table first: u64 length, u8 peer access, 7 reserved
/// </code>
/// The peer answers with u32 "ISHA" and the peer id once it has checked and mapped every region, or with u32 "ISHN"
/// and the <see cref="SharingCheck"/> that made it refuse them (then closes nothing: the socket is its caller's). All integers are
/// little-endian. Threading: one hand-over per socket, before anything else is sent on it.
/// </summary>
internal static class RegionHandover
{
    public const uint OfferMagic = 0x4D485349;   // "ISHM"
    public const uint AckMagic = 0x41485349;     // "ISHA"
    public const uint RefusalMagic = 0x4E485349; // "ISHN"
    public const ushort Version = 1;
    public const int MaxRegions = 64;
    private const int HeaderBytes = 16, EntryBytes = 16, AckBytes = 8;

    public readonly record struct Offer(uint Peer, uint Slots, (long Length, PeerAccess Access)[] Regions);

    /// <summary>Sends the description and the descriptors (table first) in one sendmsg.</summary>
    public static async Task SendOfferAsync(Socket socket, Offer offer, int[] descriptors, CancellationToken cancellation)
    {
        byte[] message = new byte[HeaderBytes + EntryBytes * offer.Regions.Length];
        BinaryPrimitives.WriteUInt32LittleEndian(message, OfferMagic);
        BinaryPrimitives.WriteUInt16LittleEndian(message.AsSpan(4), Version);
        BinaryPrimitives.WriteUInt16LittleEndian(message.AsSpan(6), (ushort)(offer.Regions.Length - 1));
        BinaryPrimitives.WriteUInt32LittleEndian(message.AsSpan(8), offer.Peer);
        BinaryPrimitives.WriteUInt32LittleEndian(message.AsSpan(12), offer.Slots);
        for (int i = 0; i < offer.Regions.Length; i++)
        {
            var entry = message.AsSpan(HeaderBytes + i * EntryBytes);
            BinaryPrimitives.WriteInt64LittleEndian(entry, offer.Regions[i].Length);
            entry[8] = (byte)offer.Regions[i].Access;
        }

        int sent = 0;
        while (sent < message.Length)
        {
            int written = sent == 0 ? SendWithDescriptors(socket, message, descriptors) : Send(socket, message.AsSpan(sent));
            if (written > 0)
            {
                sent += written;
                continue;
            }
            // Only a full send buffer gets here (the message is small): give the peer a moment to read.
            await Task.Delay(1, cancellation);
        }
    }

    private static unsafe int SendWithDescriptors(Socket socket, byte[] message, int[] descriptors)
    {
        int controlBytes = SharingNative.CmsgSpace(descriptors.Length * sizeof(int));
        byte* control = stackalloc byte[controlBytes];
        new Span<byte>(control, controlBytes).Clear();
        var header = (SharingNative.CmsgHdr*)control;
        header->Length = (nuint)(SharingNative.CmsgHeaderSize + descriptors.Length * sizeof(int));
        header->Level = SharingNative.SOL_SOCKET;
        header->Type = SharingNative.SCM_RIGHTS;
        var fds = (int*)(control + SharingNative.CmsgHeaderSize);
        for (int i = 0; i < descriptors.Length; i++) fds[i] = descriptors[i];

        fixed (byte* data = message)
        {
            var iov = new LinuxFile.IoVec { Base = data, Length = (nuint)message.Length };
            var msg = new SharingNative.MsgHdr { Iov = &iov, IovLength = 1, Control = control, ControlLength = (nuint)controlBytes };
            return Transfer(SharingNative.SendMsg((int)socket.Handle, &msg, SharingNative.MSG_DONTWAIT | SharingNative.MSG_NOSIGNAL), "sendmsg");
        }
    }

    private static unsafe int Send(Socket socket, ReadOnlySpan<byte> data)
    {
        fixed (byte* bytes = data)
        {
            var iov = new LinuxFile.IoVec { Base = bytes, Length = (nuint)data.Length };
            var msg = new SharingNative.MsgHdr { Iov = &iov, IovLength = 1 };
            return Transfer(SharingNative.SendMsg((int)socket.Handle, &msg, SharingNative.MSG_DONTWAIT | SharingNative.MSG_NOSIGNAL), "sendmsg");
        }
    }

    /// <summary>Bytes moved, 0 for "try again", or a handshake failure.</summary>
    private static int Transfer(nint result, string call)
    {
        if (result > 0) return (int)result;
        if (result == 0) throw new SharingException(SharingCheck.Handshake, "the other side closed the socket during the region hand-over");
        int error = SharingNative.LastError;
        if (error is SharingNative.EAGAIN or SharingNative.EINTR) return 0;
        throw new SharingException(SharingCheck.Handshake, $"{call} failed during the region hand-over: errno {error}");
    }

    /// <summary>
    /// Receives the description and its descriptors. Every descriptor received is either returned or closed, so a
    /// malformed offer leaks nothing. The caller owns the returned descriptors.
    /// </summary>
    public static async Task<(Offer Offer, int[] Descriptors)> ReceiveOfferAsync(Socket socket, CancellationToken cancellation)
    {
        byte[] message = new byte[HeaderBytes + EntryBytes * (MaxRegions + 1)];
        var descriptors = new List<int>();
        try
        {
            int received = 0, expected = HeaderBytes;
            while (received < expected)
            {
                // A zero-byte receive waits for data without taking any, so recvmsg below gets the descriptors.
                await socket.ReceiveAsync(Memory<byte>.Empty, SocketFlags.None, cancellation);
                received += ReceiveWithDescriptors(socket, message.AsSpan(received, expected - received), descriptors);
                if (received >= HeaderBytes && expected == HeaderBytes)
                {
                    if (BinaryPrimitives.ReadUInt32LittleEndian(message) != OfferMagic)
                        throw new SharingException(SharingCheck.Handshake, "the region hand-over does not start with its magic");
                    if (BinaryPrimitives.ReadUInt16LittleEndian(message.AsSpan(4)) != Version)
                        throw new SharingException(SharingCheck.Handshake, $"the region hand-over is version {BinaryPrimitives.ReadUInt16LittleEndian(message.AsSpan(4))}, not {Version}");
                    int count = BinaryPrimitives.ReadUInt16LittleEndian(message.AsSpan(6));
                    if (count > MaxRegions)
                        throw new SharingException(SharingCheck.Handshake, $"the region hand-over declares {count} regions, more than {MaxRegions}");
                    expected = HeaderBytes + EntryBytes * (count + 1);
                }
            }

            uint peer = BinaryPrimitives.ReadUInt32LittleEndian(message.AsSpan(8));
            uint slots = BinaryPrimitives.ReadUInt32LittleEndian(message.AsSpan(12));
            var regions = new (long, PeerAccess)[(expected - HeaderBytes) / EntryBytes];
            for (int i = 0; i < regions.Length; i++)
            {
                var entry = message.AsSpan(HeaderBytes + i * EntryBytes);
                regions[i] = (BinaryPrimitives.ReadInt64LittleEndian(entry), (PeerAccess)entry[8]);
            }
            if (descriptors.Count != regions.Length)
                throw new SharingException(SharingCheck.Handshake, $"the region hand-over carried {descriptors.Count} descriptors for {regions.Length} regions");
            return (new Offer(peer, slots, regions), descriptors.ToArray());
        }
        catch
        {
            foreach (int fd in descriptors) SharingNative.Close(fd);
            throw;
        }
    }

    private static unsafe int ReceiveWithDescriptors(Socket socket, Span<byte> buffer, List<int> descriptors)
    {
        int controlBytes = SharingNative.CmsgSpace((MaxRegions + 1) * sizeof(int));
        byte* control = stackalloc byte[controlBytes];
        fixed (byte* data = buffer)
        {
            var iov = new LinuxFile.IoVec { Base = data, Length = (nuint)buffer.Length };
            var msg = new SharingNative.MsgHdr { Iov = &iov, IovLength = 1, Control = control, ControlLength = (nuint)controlBytes };
            nint result = SharingNative.RecvMsg((int)socket.Handle, &msg, SharingNative.MSG_DONTWAIT | SharingNative.MSG_CMSG_CLOEXEC);
            if (result > 0)
            {
                // Take every descriptor first, so none leaks whatever else is wrong with the message.
                for (var header = msg.ControlLength >= (nuint)SharingNative.CmsgHeaderSize ? (SharingNative.CmsgHdr*)control : null;
                     header != null;
                     header = NextHeader(control, msg.ControlLength, header))
                {
                    if (header->Level != SharingNative.SOL_SOCKET || header->Type != SharingNative.SCM_RIGHTS) continue;
                    int count = ((int)header->Length - SharingNative.CmsgHeaderSize) / sizeof(int);
                    var fds = (int*)((byte*)header + SharingNative.CmsgHeaderSize);
                    for (int i = 0; i < count; i++) descriptors.Add(fds[i]);
                }
                if ((msg.Flags & SharingNative.MSG_CTRUNC) != 0)
                    throw new SharingException(SharingCheck.Handshake, "the region hand-over carried more descriptors than allowed");
            }
            return Transfer(result, "recvmsg");
        }
    }

    private static unsafe SharingNative.CmsgHdr* NextHeader(byte* control, nuint controlLength, SharingNative.CmsgHdr* header)
    {
        long length = (long)header->Length;
        if (length < SharingNative.CmsgHeaderSize) return null;
        byte* next = (byte*)header + ((length + 7) & ~7L);
        return next + SharingNative.CmsgHeaderSize > control + (long)controlLength ? null : (SharingNative.CmsgHdr*)next;
    }

    public static Task SendAckAsync(Socket socket, uint peer, CancellationToken cancellation) => SendAnswerAsync(socket, AckMagic, peer, cancellation);

    /// <summary>Tells the owner why its regions were refused, so it fails at once rather than at its timeout.</summary>
    public static Task SendRefusalAsync(Socket socket, SharingCheck check, CancellationToken cancellation) => SendAnswerAsync(socket, RefusalMagic, (uint)check, cancellation);

    private static async Task SendAnswerAsync(Socket socket, uint magic, uint value, CancellationToken cancellation)
    {
        byte[] answer = new byte[AckBytes];
        BinaryPrimitives.WriteUInt32LittleEndian(answer, magic);
        BinaryPrimitives.WriteUInt32LittleEndian(answer.AsSpan(4), value);
        int sent = 0;
        while (sent < answer.Length)
            sent += await socket.SendAsync(answer.AsMemory(sent), SocketFlags.None, cancellation);
    }

    public static async Task ReceiveAckAsync(Socket socket, uint peer, CancellationToken cancellation)
    {
        byte[] ack = new byte[AckBytes];
        int received = 0;
        while (received < ack.Length)
        {
            int read = await socket.ReceiveAsync(ack.AsMemory(received), SocketFlags.None, cancellation);
            if (read == 0) throw new SharingException(SharingCheck.Handshake, "the peer closed the socket instead of acknowledging the regions (it refused them)");
            received += read;
        }
        if (BinaryPrimitives.ReadUInt32LittleEndian(ack) == RefusalMagic)
            throw new SharingException(SharingCheck.Handshake, $"the peer refused the regions: its {(SharingCheck)BinaryPrimitives.ReadUInt32LittleEndian(ack.AsSpan(4))} check failed");
        if (BinaryPrimitives.ReadUInt32LittleEndian(ack) != AckMagic || BinaryPrimitives.ReadUInt32LittleEndian(ack.AsSpan(4)) != peer)
            throw new SharingException(SharingCheck.Handshake, "the peer's acknowledgement of the regions is malformed");
    }
}
