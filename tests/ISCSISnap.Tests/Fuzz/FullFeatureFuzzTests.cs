using System.Buffers.Binary;
using ISCSISnap.Tests.Support;
using Xunit;

namespace ISCSISnap.Tests.Fuzz;

/// <summary>
/// Bad input in full feature phase, each case with the answer RFC 7143 and the target's documented choices call
/// for: a Reject (echoing the offending header), a silently ignored PDU, or a Reject and a closed connection.
/// Afterwards the fuzzed session (when it survives) still works, and so does a bystander session.
/// </summary>
public sealed class FullFeatureFuzzTests
{
    private static readonly TimeSpan Quiet = TimeSpan.FromSeconds(1);
    private static readonly TimeSpan Patience = FuzzEnvironment.Patience;

    private static LoginOptions Options(bool initialR2T = false, bool immediateData = true, string headerDigest = "None", string dataDigest = "None") => new()
    {
        TargetName = InProcessTarget.TargetName, InitialR2T = initialR2T, ImmediateData = immediateData,
        HeaderDigest = headerDigest, DataDigest = dataDigest,
    };

    /// <summary>Frames <paramref name="header"/> with the session's negotiated digests (or wrong ones) and sends it as is.</summary>
    private static async Task<byte[]> SendAsync(TestInitiator victim, byte[] header, byte[]? data = null, byte[]? ahs = null,
        bool badHeaderDigest = false, bool badDataDigest = false, bool setLengths = true)
    {
        bool headerDigest = victim.NegotiatedKeys.GetValueOrDefault("HeaderDigest") == "CRC32C";
        bool dataDigest = victim.NegotiatedKeys.GetValueOrDefault("DataDigest") == "CRC32C";
        await victim.SendRawAsync(FuzzPdu.Frame(header, data, ahs, headerDigest, dataDigest, badHeaderDigest, badDataDigest, setLengths));
        return header;
    }

    /// <summary>The fuzzed session still writes and reads back correct data.</summary>
    private static async Task AssertUsableAsync(TestInitiator victim, uint lba = 1000)
    {
        Assert.False(victim.Closed, "the fuzzed session was disconnected");
        var data = FuzzPdu.Pattern((int)lba + Environment.TickCount, 8192);
        var write = await victim.ExecuteAsync(Cdb.Write10(lba, 16), dataOut: data).WaitAsync(Patience);
        Assert.True(write.Good, $"write after the bad input failed: status {write.Status}, rejected {write.Rejected} (0x{write.RejectReason:x2})");
        var read = await victim.ExecuteAsync(Cdb.Read10(lba, 16), expectedDataIn: data.Length).WaitAsync(Patience);
        Assert.True(read.Good);
        Assert.Equal(data, read.DataIn);
    }

    private static async Task<byte[]> WritePatternAsync(TestInitiator initiator, uint lba, int blocks)
    {
        var data = FuzzPdu.Pattern((int)lba * 31 + blocks, blocks * 512);
        var write = await initiator.ExecuteAsync(Cdb.Write10(lba, (ushort)blocks), dataOut: data).WaitAsync(Patience);
        Assert.True(write.Good);
        return data;
    }

    private static async Task AssertBlocksAsync(TestInitiator initiator, uint lba, byte[] expected, string why)
    {
        var read = await initiator.ExecuteAsync(Cdb.Read10(lba, (ushort)(expected.Length / 512)), expectedDataIn: expected.Length).WaitAsync(Patience);
        Assert.True(read.Good);
        Assert.True(expected.AsSpan().SequenceEqual(read.DataIn), why);
    }

    private static void AssertScsiResponse(ReceivedPdu? pdu, uint itt, byte status)
    {
        Assert.NotNull(pdu);
        Assert.True(pdu.Opcode == 0x21, $"expected a SCSI Response, got opcode 0x{pdu.Opcode:x2}");
        Assert.Equal(itt, pdu.Itt);
        Assert.True(pdu.Header[3] == status, $"expected status 0x{status:x2}, got 0x{pdu.Header[3]:x2}");
    }

    /// <summary>Sense key and ASC/ASCQ of a SCSI Response's data segment (fixed or descriptor format).</summary>
    private static (int Key, int Asc, int Ascq) Sense(ReceivedPdu pdu)
    {
        var sense = pdu.Data.AsSpan(2);
        return sense[0] is 0x72 or 0x73 ? (sense[1] & 0x0F, sense[2], sense[3]) : (sense[2] & 0x0F, sense[12], sense[13]);
    }

    // ---------------------------------------------------------------- opcodes

    [Theory]
    [InlineData(0x07)]
    [InlineData(0x08)]
    [InlineData(0x0F)]
    [InlineData(0x11)]
    [InlineData(0x1C)]
    [InlineData(0x1E)]
    [InlineData(0x20)]   // target opcodes from an initiator
    [InlineData(0x21)]
    [InlineData(0x25)]
    [InlineData(0x3F)]
    public async Task Unknown_opcode_is_rejected_with_the_header_echoed(byte opcode)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        var header = await SendAsync(victim, victim.NewHeader(opcode, 0x80, victim.NextItt(), immediate: true), data: FuzzPdu.Pattern(opcode, 101));
        await Expect.RejectAsync(victim, 0x05, header);
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    [Fact]
    public async Task Snack_is_rejected_at_error_recovery_level_0()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        var header = victim.NewHeader(0x10, 0x80, victim.NextItt());
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(40), 0);   // BegRun
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(44), 1);   // RunLength
        await SendAsync(victim, header);
        await Expect.RejectAsync(victim, 0x05, header);
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    [Fact]
    public async Task Login_request_in_full_feature_phase_is_a_protocol_error()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        var header = FuzzPdu.LoginHeader(FuzzPdu.LoginFlags(true, 1, 3), itt: victim.NextItt());
        await SendAsync(victim, header, FuzzPdu.Text(FuzzPdu.GoodLoginKeys));
        await Expect.RejectAsync(victim, 0x04, header);
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    // ---------------------------------------------------------------- lengths

    [Fact]
    public async Task Data_segment_above_max_recv_data_segment_length_is_rejected_and_closed()
    {
        await using var env = await FuzzEnvironment.StartAsync(o => o.MaxRecvDataSegmentLength = 8192);
        await using var victim = await env.LoginAsync();
        Assert.Equal("8192", victim.NegotiatedKeys["MaxRecvDataSegmentLength"]);
        var atLimit = FuzzPdu.Pattern(1, 8192);
        Assert.Equal(atLimit, await victim.PingAsync(atLimit).WaitAsync(Patience));   // exactly the limit is fine

        var header = victim.NewHeader(0x00, 0x80, victim.NextItt(), immediate: true);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), 0xFFFFFFFF);
        FuzzPdu.SetDataSegmentLength(header, 8193);
        await SendAsync(victim, header, setLengths: false);   // the header alone: the data never comes
        await Expect.RejectAsync(victim, 0x04, header);
        await Expect.ClosedAsync(victim, TimeSpan.FromSeconds(5));
        await env.WaitForSessionCountAsync(1);
        await env.AssertFreshLoginWorksAsync();
        await env.AssertBystanderUndisturbedAsync();
    }

    [Fact]
    public async Task Ahs_length_claiming_more_than_sent_then_close_is_cleaned_up()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        var header = FuzzPdu.ScsiCommand(victim, victim.NextItt(), Cdb.TestUnitReady(), 0);
        header[4] = 4;   // 16 bytes of AHS announced, none sent
        await SendAsync(victim, header, setLengths: false);
        await Expect.SilenceAsync(victim, TimeSpan.FromMilliseconds(500));   // the target waits for the rest
        victim.Abort();
        await env.WaitForSessionCountAsync(1);
        await env.AssertFreshLoginWorksAsync();
        await env.AssertBystanderUndisturbedAsync();
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Ahs_of_255_words_is_rejected_and_closed(bool sendTheAhs)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        var header = FuzzPdu.ScsiCommand(victim, victim.NextItt(), Cdb.TestUnitReady(), 0);
        victim.CmdSN++;
        if (sendTheAhs)
        {
            var ahs = FuzzPdu.Pattern(255, 255 * 4);
            await SendAsync(victim, header, ahs: ahs);
        }
        else
        {
            header[4] = 255;
            await SendAsync(victim, header, setLengths: false);
        }
        await Expect.RejectAsync(victim, 0x04, header);
        await Expect.ClosedAsync(victim, TimeSpan.FromSeconds(5));
        await env.WaitForSessionCountAsync(1);
        await env.AssertFreshLoginWorksAsync();
        await env.AssertBystanderUndisturbedAsync();
    }

    [Theory]
    [InlineData("unknown-type", 0x00)]          // skipped: the command runs
    [InlineData("cdb-too-long", 0x02)]          // extended CDB past 260 bytes: INVALID FIELD IN CDB
    [InlineData("bidirectional", 0x02)]         // bidirectional read length: not supported
    [InlineData("length-past-the-end", 0x00)]   // an AHS whose own length runs past the segment is ignored
    public async Task Ahs_content_within_the_limits_is_parsed_safely(string kind, byte status)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        byte[] ahs = kind switch
        {
            "unknown-type" => [0x00, 0x05, 0x3C, 0x00, 1, 2, 3, 4],
            "cdb-too-long" => [0x00, 250, 0x01, 0x00, .. new byte[252]],   // 3 + 250 bytes, padded to 256
            "bidirectional" => [0x00, 0x05, 0x02, 0x00, 0, 0, 0x10, 0],
            "length-past-the-end" => [0xFF, 0xFF, 0x01, 0x00, 9, 9, 9, 9],
            _ => throw new ArgumentOutOfRangeException(nameof(kind)),
        };
        uint itt = victim.NextItt();
        var header = FuzzPdu.ScsiCommand(victim, itt, Cdb.TestUnitReady(), 0);
        victim.CmdSN++;
        await SendAsync(victim, header, ahs: ahs);
        var response = await Expect.NextAsync(victim, Patience);
        AssertScsiResponse(response, itt, status);
        if (status == 0x02) Assert.Equal((5, 0x24, 0), Sense(response!));   // ILLEGAL REQUEST, INVALID FIELD IN CDB
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    // ---------------------------------------------------------------- digests

    [Theory]
    [InlineData("None")]
    [InlineData("CRC32C")]
    public async Task Header_digest_mismatch_closes_the_connection(string dataDigest)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync(Options(headerDigest: "CRC32C", dataDigest: dataDigest));
        Assert.Equal("CRC32C", victim.NegotiatedKeys["HeaderDigest"]);
        var header = victim.NewHeader(0x00, 0x80, victim.NextItt(), immediate: true);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), 0xFFFFFFFF);
        await SendAsync(victim, header, data: FuzzPdu.Pattern(3, 40), badHeaderDigest: true);
        await Expect.ClosedAsync(victim, TimeSpan.FromSeconds(5));   // nothing in the header can be trusted: no Reject
        await env.WaitForSessionCountAsync(1);
        await env.AssertFreshLoginWorksAsync();
        await env.AssertBystanderUndisturbedAsync();
    }

    [Fact]
    public async Task Data_digest_mismatch_on_a_nop_out_is_rejected_and_the_connection_stays()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync(Options(headerDigest: "CRC32C", dataDigest: "CRC32C"));
        var header = victim.NewHeader(0x00, 0x80, victim.NextItt(), immediate: true);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), 0xFFFFFFFF);
        await SendAsync(victim, header, data: FuzzPdu.Pattern(4, 100), badDataDigest: true);
        await Expect.RejectAsync(victim, 0x02, header);
        var echo = FuzzPdu.Pattern(5, 100);
        Assert.Equal(echo, await victim.PingAsync(echo).WaitAsync(Patience));
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    [Fact]
    public async Task Data_digest_mismatch_in_immediate_data_never_reaches_the_medium()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync(Options(dataDigest: "CRC32C"));
        var before = await WritePatternAsync(victim, 50, 8);
        uint itt = victim.NextItt();
        var header = FuzzPdu.ScsiCommand(victim, itt, Cdb.Write10(50, 8), 4096, write: true);
        victim.CmdSN++;
        await SendAsync(victim, header, data: FuzzPdu.Pattern(6, 4096), badDataDigest: true);
        await Expect.RejectAsync(victim, 0x02, header);
        await Expect.SilenceAsync(victim, Quiet);   // the command was dropped: no response for it
        await AssertBlocksAsync(victim, 50, before, "data with a bad digest was written");
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    [Fact]
    public async Task Data_digest_mismatch_in_data_out_fails_the_command_with_a_crc_error()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync(Options(initialR2T: false, immediateData: false, dataDigest: "CRC32C"));
        var before = await WritePatternAsync(victim, 60, 8);
        uint itt = victim.NextItt();
        await SendAsync(victim, FuzzPdu.ScsiCommand(victim, itt, Cdb.Write10(60, 8), 4096, write: true, final: false));
        victim.CmdSN++;
        var dataOut = await SendAsync(victim, FuzzPdu.DataOut(victim, itt, 0xFFFFFFFF, 0, 0), data: FuzzPdu.Pattern(7, 4096), badDataDigest: true);
        await Expect.RejectAsync(victim, 0x02, dataOut);
        var response = await Expect.NextAsync(victim, Patience);
        AssertScsiResponse(response, itt, 0x02);
        Assert.Equal((0x0B, 0x47, 0x05), Sense(response!));   // ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR
        await AssertBlocksAsync(victim, 60, before, "data with a bad digest was written");
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    // ---------------------------------------------------------------- sequence numbers and tags

    [Theory]
    [InlineData(0x01, 200)]          // beyond MaxCmdSN
    [InlineData(0x01, -1)]           // already used
    [InlineData(0x01, -1000)]
    [InlineData(0x01, int.MinValue)] // half the serial number space away
    [InlineData(0x00, 200)]          // NOP-Out
    [InlineData(0x00, -1)]
    public async Task Out_of_window_cmdsn_is_silently_ignored(byte opcode, int delta)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        await AssertUsableAsync(victim);   // some CmdSNs are behind us
        uint itt = victim.NextItt();
        var header = opcode == 0x01
            ? FuzzPdu.ScsiCommand(victim, itt, Cdb.TestUnitReady(), 0)
            : victim.NewHeader(0x00, 0x80, itt);
        if (opcode == 0x00) BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), 0xFFFFFFFF);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), unchecked(victim.CmdSN + (uint)delta));
        await SendAsync(victim, header);
        await Expect.SilenceAsync(victim, Quiet);

        // The right CmdSN still works, and the ignored command left no task behind: its ITT is free.
        Assert.True((await victim.ExecuteAsync(Cdb.TestUnitReady()).WaitAsync(Patience)).Good);
        await SendAsync(victim, FuzzPdu.ScsiCommand(victim, itt, Cdb.TestUnitReady(), 0));
        victim.CmdSN++;
        AssertScsiResponse(await Expect.NextAsync(victim, Patience), itt, 0x00);
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    [Fact]
    public async Task Duplicate_itt_of_a_command_in_progress_is_rejected_as_task_in_progress()
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync(Options(initialR2T: true, immediateData: false));
        uint itt = victim.NextItt();
        // A WRITE without data: it waits for Data-Out (its R2T goes unanswered).
        await SendAsync(victim, FuzzPdu.ScsiCommand(victim, itt, Cdb.Write10(70, 8), 4096, write: true));
        victim.CmdSN++;

        var duplicate = await SendAsync(victim, FuzzPdu.ScsiCommand(victim, itt, Cdb.Read10(0, 1), 512, read: true));
        victim.CmdSN++;
        await Expect.RejectAsync(victim, 0x07, duplicate);
        var immediateDuplicate = await SendAsync(victim, FuzzPdu.ScsiCommand(victim, itt, Cdb.TestUnitReady(), 0, immediate: true));
        await Expect.RejectAsync(victim, 0x07, immediateDuplicate);

        // The rejected commands consumed their CmdSNs: the session goes on, and the waiting task can be aborted.
        await AssertUsableAsync(victim);
        Assert.Equal(0, await victim.TaskManagementAsync(1, 0, itt).WaitAsync(Patience));
        await SendAsync(victim, FuzzPdu.ScsiCommand(victim, itt, Cdb.TestUnitReady(), 0));
        victim.CmdSN++;
        AssertScsiResponse(await Expect.NextAsync(victim, Patience), itt, 0x00);   // the tag is free again
        await env.AssertBystanderUndisturbedAsync();
    }

    [Theory]
    [InlineData(0xFFFFFFFF)]
    [InlineData(0x00001234)]
    public async Task Data_out_for_an_unknown_task_is_ignored(uint ttt)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        var before = await WritePatternAsync(victim, 0, 8);
        await SendAsync(victim, FuzzPdu.DataOut(victim, 0xDEAD0001, ttt, 0, 0), data: FuzzPdu.Pattern(8, 4096));
        await Expect.SilenceAsync(victim, Quiet);
        await AssertBlocksAsync(victim, 0, before, "Data-Out without a task reached the medium");
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    [Theory]
    [InlineData("data-sn")]
    [InlineData("offset")]
    [InlineData("beyond-the-burst")]
    [InlineData("unknown-ttt")]
    [InlineData("unsolicited-after-the-burst")]
    public async Task Broken_data_out_sequence_is_rejected_and_ends_only_that_command(string kind)
    {
        bool solicited = kind is "unknown-ttt" or "unsolicited-after-the-burst";
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync(Options(initialR2T: solicited, immediateData: false));
        var before = await WritePatternAsync(victim, 80, 8);
        uint itt = victim.NextItt();
        await SendAsync(victim, FuzzPdu.ScsiCommand(victim, itt, Cdb.Write10(80, 8), 4096, write: true, final: solicited));
        victim.CmdSN++;

        var (ttt, dataSN, offset, length) = kind switch
        {
            "data-sn" => (0xFFFFFFFFu, 1u, 0u, 4096),
            "offset" => (0xFFFFFFFFu, 0u, 512u, 3584),
            "beyond-the-burst" => (0xFFFFFFFFu, 0u, 0u, 8192),
            "unknown-ttt" => (0x0BADF00Du, 0u, 0u, 4096),
            _ => (0xFFFFFFFFu, 0u, 0u, 4096),
        };
        var bad = await SendAsync(victim, FuzzPdu.DataOut(victim, itt, ttt, dataSN, offset), data: FuzzPdu.Pattern(9, length));
        await Expect.RejectAsync(victim, 0x04, bad);

        // The command is over: a well-formed Data-Out for it now finds no task, and no response ever comes.
        await SendAsync(victim, FuzzPdu.DataOut(victim, itt, 0xFFFFFFFF, 0, 0), data: FuzzPdu.Pattern(10, 4096));
        await Expect.SilenceAsync(victim, Quiet);
        await AssertBlocksAsync(victim, 80, before, "a broken data sequence reached the medium");
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    [Fact]
    public async Task Broken_and_aborted_writes_do_not_use_up_the_sessions_r2ts()
    {
        // Every R2T-soliciting write that ends early (broken data sequence, ABORT TASK) must give its R2T slots
        // back: command slots are reused, and a slot whose R2Ts all look busy would never solicit data again.
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync(Options(initialR2T: true, immediateData: false));
        for (int i = 0; i < 40; i++)
        {
            uint itt = victim.NextItt();
            await SendAsync(victim, FuzzPdu.ScsiCommand(victim, itt, Cdb.Write10(90, 8), 4096, write: true));
            victim.CmdSN++;
            if (i % 2 == 0)
            {
                var bad = await SendAsync(victim, FuzzPdu.DataOut(victim, itt, 0x0BADF00D, 0, 0), data: FuzzPdu.Pattern(i, 512));
                await Expect.RejectAsync(victim, 0x04, bad);
            }
            else
            {
                Assert.Equal(0, await victim.TaskManagementAsync(1, 0, itt).WaitAsync(Patience));
            }
        }
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    [Theory]
    [InlineData(false, 512)]     // ImmediateData=No
    [InlineData(true, 8192)]     // more immediate data than the expected transfer length (its first burst)
    public async Task Unexpected_immediate_data_is_rejected(bool immediateData, int length)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync(Options(initialR2T: true, immediateData: immediateData));
        var before = await WritePatternAsync(victim, 100, 8);
        uint itt = victim.NextItt();
        var header = await SendAsync(victim, FuzzPdu.ScsiCommand(victim, itt, Cdb.Write10(100, 8), 4096, write: true), data: FuzzPdu.Pattern(11, length));
        victim.CmdSN++;
        await Expect.RejectAsync(victim, 0x04, header);
        await Expect.SilenceAsync(victim, Quiet);
        await AssertBlocksAsync(victim, 100, before, "refused immediate data reached the medium");
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    // ---------------------------------------------------------------- text and logout

    [Theory]
    [InlineData("no-equals", 0x04)]
    [InlineData("empty-key", 0x04)]
    [InlineData("bad-character", 0x04)]
    [InlineData("key-of-64-bytes", 0x04)]
    [InlineData("value-not-utf8", 0x04)]
    [InlineData("unknown-ttt", 0x09)]
    public async Task Malformed_text_request_is_rejected(string kind, byte reason)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        var header = victim.NewHeader(0x04, 0x80, victim.NextItt(), immediate: true);
        BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), kind == "unknown-ttt" ? 0x4242u : 0xFFFFFFFFu);
        byte[] text = kind switch
        {
            "no-equals" => FuzzPdu.Text("SendTargets"),
            "empty-key" => FuzzPdu.Text("=All"),
            "bad-character" => FuzzPdu.Text("Send Targets=All"),
            "key-of-64-bytes" => FuzzPdu.Text(new string('k', 64) + "=1"),
            "value-not-utf8" => [.. "MaxBurstLength="u8.ToArray(), 0xFF, 0xFE, 0x00],
            _ => FuzzPdu.Text("SendTargets=All"),
        };
        await SendAsync(victim, header, data: text);
        await Expect.RejectAsync(victim, reason, header);
        var keys = await victim.TextAsync([("SendTargets", "All")]).WaitAsync(Patience);
        Assert.Contains(keys, k => k.Key == "TargetName" && k.Value == InProcessTarget.TargetName);
        await AssertUsableAsync(victim);
        await env.AssertBystanderUndisturbedAsync();
    }

    [Theory]
    [InlineData(3)]
    [InlineData(0x7F)]
    public async Task Logout_with_an_invalid_reason_is_rejected(byte reason)
    {
        await using var env = await FuzzEnvironment.StartAsync();
        await using var victim = await env.LoginAsync();
        var header = await SendAsync(victim, victim.NewHeader(0x06, (byte)(0x80 | reason), victim.NextItt(), immediate: true));
        await Expect.RejectAsync(victim, 0x09, header);
        await AssertUsableAsync(victim);
        Assert.Equal(0, await victim.LogoutAsync().WaitAsync(Patience));
        await env.WaitForSessionCountAsync(1);
        await env.AssertBystanderUndisturbedAsync();
    }
}
