using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using ISCSISnap.Storage.Sharing;
using Microsoft.Extensions.Logging;

namespace ISCSISnap.SharingPeer;

/// <summary>What the peer answered to a command.</summary>
public readonly record struct PeerReply(byte Status, int Value, byte[] Payload)
{
    public SharingCheck Check => (SharingCheck)Status;
}

/// <summary>
/// The owner's end of a peer child process: starts <c>ISCSISnap.SharingPeer</c>, accepts its connection on a Unix
/// socket, offers it regions and sends it commands. For tests and benchmarks.
/// </summary>
public sealed class PeerProcess : IAsyncDisposable
{
    private readonly string _directory;
    private readonly byte[] _command = new byte[PeerProtocol.CommandBytes];
    private readonly byte[] _replyHeader = new byte[PeerProtocol.ReplyHeaderBytes];

    private PeerProcess(string directory, Process process, Socket socket)
    {
        _directory = directory;
        Process = process;
        Socket = socket;
    }

    public Process Process { get; }
    public Socket Socket { get; }
    public OwnerLink? Link { get; private set; }

    /// <summary>Starts a peer process and takes its connection (no regions offered yet).</summary>
    public static async Task<PeerProcess> LaunchAsync(CancellationToken cancellation = default)
    {
        string directory = Directory.CreateTempSubdirectory("iscsisnap-share-").FullName;
        string path = Path.Combine(directory, "owner.sock");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);

        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        start.ArgumentList.Add(PeerExecutable);
        start.ArgumentList.Add(path);
        var process = Process.Start(start) ?? throw new InvalidOperationException("the peer process did not start");
        try
        {
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellation);
            timeout.CancelAfter(TimeSpan.FromSeconds(60));
            var accepting = listener.AcceptAsync(timeout.Token).AsTask();
            var exited = process.WaitForExitAsync(timeout.Token);
            if (await Task.WhenAny(accepting, exited) == exited && !accepting.IsCompleted)
                throw new InvalidOperationException($"the peer process exited with code {process.ExitCode} before connecting: {await process.StandardError.ReadToEndAsync(cancellation)}");
            return new PeerProcess(directory, process, await accepting);
        }
        catch
        {
            process.Kill();
            process.Dispose();
            Directory.Delete(directory, recursive: true);
            throw;
        }
    }

    /// <summary>The peer's executable, built beside this assembly.</summary>
    private static string PeerExecutable => Path.Combine(AppContext.BaseDirectory, "ISCSISnap.SharingPeer.dll");

    /// <summary>Offers the peer its regions, expecting this peer process unless <paramref name="expected"/> says otherwise.</summary>
    public async Task<OwnerLink> OfferAsync(IReadOnlyList<RegionSpec> regions, ExpectedPeer? expected = null, SharingLinkOptions? options = null, ILogger? logger = null)
    {
        Link = await OwnerLink.OfferAsync(Socket, expected ?? new ExpectedPeer(Process.Id, PeerCredentials.Current.Uid), regions, options, logger);
        return Link;
    }

    public async Task<PeerReply> SendAsync(PeerCommand command, SharedHandle handle = default, HandleRights rights = HandleRights.None,
        long offset = 0, int length = -1, byte argument = 0)
    {
        _command[0] = (byte)command;
        handle.WriteTo(_command.AsSpan(1));
        _command[17] = (byte)rights;
        BinaryPrimitives.WriteInt64LittleEndian(_command.AsSpan(18), offset);
        BinaryPrimitives.WriteInt32LittleEndian(_command.AsSpan(26), length);
        _command[30] = argument;
        await Socket.SendAsync(_command, SocketFlags.None);
        return await ReadReplyAsync();
    }

    /// <summary>Sends <paramref name="data"/> after a <see cref="PeerCommand.ReceiveBytes"/> command, in one send.</summary>
    public async Task<PeerReply> SendBytesAsync(ReadOnlyMemory<byte> data)
    {
        _command.AsSpan().Clear();
        _command[0] = (byte)PeerCommand.ReceiveBytes;
        BinaryPrimitives.WriteInt32LittleEndian(_command.AsSpan(26), data.Length);
        await Socket.SendAsync(_command, SocketFlags.None);
        await Socket.SendAsync(data, SocketFlags.None);
        return await ReadReplyAsync();
    }

    private async Task<PeerReply> ReadReplyAsync()
    {
        if (!await Program.ReadExactlyAsync(Socket, _replyHeader)) throw new EndOfStreamException("the peer closed its socket");
        int length = BinaryPrimitives.ReadInt32LittleEndian(_replyHeader.AsSpan(5));
        byte[] payload = length == 0 ? [] : new byte[length];
        if (length > 0 && !await Program.ReadExactlyAsync(Socket, payload)) throw new EndOfStreamException("the peer closed its socket");
        return new PeerReply(_replyHeader[0], BinaryPrimitives.ReadInt32LittleEndian(_replyHeader.AsSpan(1)), payload);
    }

    private bool _disposed;

    public async ValueTask DisposeAsync()
    {
        if (_disposed) return;
        _disposed = true;
        Link?.Dispose();
        Socket.Dispose();
        if (!Process.HasExited)
        {
            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(10));
            try { await Process.WaitForExitAsync(timeout.Token); }
            catch (OperationCanceledException) { Process.Kill(); }
        }
        Process.Dispose();
        Directory.Delete(_directory, recursive: true);
    }
}
