using System.Buffers.Binary;
using System.Diagnostics;
using System.Text;
using ISCSISnap.Tests.Support;
using Xunit;
using Xunit.Abstractions;

namespace ISCSISnap.Tests.Fuzz;

/// <summary>
/// A reproducible mutation fuzzer: for each fixed seed, batches of valid PDUs (login, SCSI commands, Data-Out,
/// NOP-Out, Text, task management, logout) with random header bytes, opcodes, flags, tags, sequence numbers,
/// lengths, AHS, digests, truncation and appended garbage, each batch on fresh connections. After every batch
/// the portal must still accept a login, two bystander sessions (one on the fuzzed target, one on another target)
/// must read their data back intact and write new data, and the target must have logged no crash; at the end the
/// process must not have grown by more than 200 MB.
/// </summary>
/// <remarks>
/// Batch <c>b</c> of seed <c>s</c> draws everything from <c>new Random(s * 7919 + b)</c>: a failure names both, and
/// the same pair replays the same bytes. The fuzzed sessions use only commands that cannot legitimately affect
/// other initiators (no resets, reservations, mode changes, or writes near the bystander's blocks); bytes that may
/// be framed as headers after a deliberate desynchronisation (payloads, garbage) come from 'a'..'z', which are
/// neither SCSI commands nor task management requests.
/// </remarks>
[Collection(ISCSISnap.Tests.Support.ProcessWideMeasurements.Name)]
public sealed class MutationFuzzTests(ITestOutputHelper output)
{
    private const long AllowedGrowth = 200L << 20;

    /// <summary>Batches per seed; ISCSISNAP_FUZZ_BATCHES raises it for a longer hunt.</summary>
    private static int BatchesPerSeed => int.TryParse(Environment.GetEnvironmentVariable("ISCSISNAP_FUZZ_BATCHES"), out int n) && n > 0 ? n : 40;

    /// <summary>The fixed seeds, or those in ISCSISNAP_FUZZ_SEEDS (comma-separated) to replay or explore.</summary>
    public static TheoryData<int> Seeds
    {
        get
        {
            var seeds = new TheoryData<int>();
            var custom = Environment.GetEnvironmentVariable("ISCSISNAP_FUZZ_SEEDS");
            foreach (int seed in string.IsNullOrWhiteSpace(custom) ? [1, 2, 3, 7143, 424242, 20261101] : custom.Split(',').Select(int.Parse))
                seeds.Add(seed);
            return seeds;
        }
    }

    [Theory]
    [MemberData(nameof(Seeds))]
    public async Task Mutated_pdus_never_crash_the_target_nor_disturb_other_sessions(int seed)
    {
        var clock = Stopwatch.StartNew();
        await using var env = await FuzzEnvironment.StartAsync(o =>
        {
            o.LoginTimeoutSeconds = 2;
            o.MaxRecvDataSegmentLength = seed % 2 == 0 ? 8192 : 65536;
        });
        await using var second = SecondTarget.Add(env.Target);
        await using var otherInitiator = await TestInitiator.ConnectAsync(env.EndPoint);
        var otherLogin = await otherInitiator.LoginAsync(new LoginOptions { TargetName = SecondTarget.Name, InitiatorName = "iqn.2026-11.io.iscsisnap.test:elsewhere" });
        Assert.True(otherLogin.Succeeded);
        await otherInitiator.ClearUnitAttentionsAsync();
        var elsewhere = new BystanderSession(otherInitiator, 1000, 32);
        await elsewhere.WritePatternAsync();

        long heapBefore = GC.GetTotalMemory(forceFullCollection: true);
        long workingSetBefore = Environment.WorkingSet;
        int pdus = 0;
        var stats = new FuzzStats();
        for (int batch = 0; batch < BatchesPerSeed; batch++)
        {
            string context = $"seed {seed}, batch {batch}: ";
            var journal = new StringBuilder();
            try
            {
                var rng = new Random(seed * 7919 + batch);
                int mode = rng.Next(8);
                if (mode <= 1)
                {
                    pdus += await LoginPhaseBatchAsync(env, rng, journal, stats);
                }
                else if (mode == 7)
                {
                    var a = new Random(rng.Next());
                    var b = new Random(rng.Next());
                    var journalB = new StringBuilder();
                    var counts = await Task.WhenAll(FullFeatureBatchAsync(env, a, journal, stats), FullFeatureBatchAsync(env, b, journalB, stats));
                    journal.Append("-- concurrently:\n").Append(journalB);
                    pdus += counts.Sum();
                }
                else
                {
                    pdus += await FullFeatureBatchAsync(env, rng, journal, stats);
                }

                await env.WaitForSessionCountAsync(2, context);   // the two bystanders: every fuzzed session is gone
                await env.AssertFreshLoginWorksAsync(context);
                await env.WaitForSessionCountAsync(2, context);
                await env.AssertBystanderUndisturbedAsync(context);
                await elsewhere.AssertUndisturbedAsync(context);
            }
            catch (Exception e)
            {
                string report = $"{context}{e.Message}\nreplay: seed {seed}, batch {batch} (new Random({seed * 7919 + batch}))\n" +
                    $"PDUs sent:\n{journal}\nrecent target log:\n{env.Logs.Recent}";
                output.WriteLine(report);
                throw new FuzzFailureException(report, e);
            }
        }

        long heapAfter = GC.GetTotalMemory(forceFullCollection: true);
        long workingSetAfter = Environment.WorkingSet;
        output.WriteLine($"seed {seed}: {BatchesPerSeed} batches, {pdus} PDUs in {clock.Elapsed.TotalSeconds:F1} s; " +
            $"managed heap {(heapAfter - heapBefore) >> 20:+0;-0} MiB, working set {(workingSetAfter - workingSetBefore) >> 20:+0;-0} MiB\n{stats}");
        foreach (var unanswered in stats.Unanswered.Take(3)) output.WriteLine("UNANSWERED PING:\n" + unanswered);
        Assert.True(heapAfter - heapBefore < AllowedGrowth, $"seed {seed}: the managed heap grew by {(heapAfter - heapBefore) >> 20} MiB");
        Assert.True(workingSetAfter - workingSetBefore < AllowedGrowth, $"seed {seed}: the working set grew by {(workingSetAfter - workingSetBefore) >> 20} MiB");
    }

    // ---------------------------------------------------------------- batches

    /// <summary>Mutated login PDUs (and the odd non-login one) on a bare connection.</summary>
    private static async Task<int> LoginPhaseBatchAsync(FuzzEnvironment env, Random rng, StringBuilder journal, FuzzStats stats)
    {
        await using var raw = await RawConnection.ConnectAsync(env.EndPoint);
        var generator = new LoginGenerator(rng);
        int count = rng.Next(1, 6);
        int sent = 0;
        for (int i = 0; i < count; i++)
        {
            var bytes = generator.Next(last: i == count - 1, out string description);
            journal.Append("  login ").Append(i).Append(": ").AppendLine(description);
            if (!await raw.SendAsync(bytes)) break;
            sent++;
            if (rng.Next(3) == 0) await Task.Delay(rng.Next(1, 10));
        }
        try
        {
            foreach (var pdu in await raw.WaitForCloseAsync(TimeSpan.FromMilliseconds(rng.Next(20, 150)))) stats.Received(pdu);
            stats.Count("closed by the target (login phase)");
        }
        catch (TimeoutException)
        {
            stats.Count("left open (login phase)");
        }
        return sent;
    }

    /// <summary>A session logged in with random parameters, then fed mutated full feature phase PDUs.</summary>
    private static async Task<int> FullFeatureBatchAsync(FuzzEnvironment env, Random rng, StringBuilder journal, FuzzStats stats)
    {
        var options = new LoginOptions
        {
            TargetName = InProcessTarget.TargetName,
            InitiatorName = FuzzPdu.FuzzInitiator,
            HeaderDigest = rng.Next(3) == 0 ? "CRC32C" : "None",
            DataDigest = rng.Next(3) == 0 ? "CRC32C" : "None",
            InitialR2T = rng.Next(2) == 0,
            ImmediateData = rng.Next(3) != 0,
            MaxOutstandingR2T = rng.Next(1, 5),
            FirstBurstLength = rng.Next(2) == 0 ? 8192 : 65536,
            MaxRecvDataSegmentLength = rng.Next(2) == 0 ? 8192 : 262144,
        };
        journal.AppendLine($"  login: digests {options.HeaderDigest}/{options.DataDigest}, InitialR2T {options.InitialR2T}, " +
            $"ImmediateData {options.ImmediateData}, MaxOutstandingR2T {options.MaxOutstandingR2T}, FirstBurst {options.FirstBurstLength}");
        await using var victim = await env.LoginAsync(options);
        var generator = new FullFeatureGenerator(rng, victim);
        int count = rng.Next(1, 32);
        int sent = 0;
        var legit = new List<(string What, Task<ScsiResult> Result)>();
        for (int i = 0; i < count && !victim.Closed; i++)
        {
            if (i == count - 1 && legit.Count > 0) await AssertLegitCommandsCompleteAsync(victim, legit, generator, stats);
            if (i > 0 && rng.Next(5) == 0)
            {
                // Resynchronise CmdSN with the target (mutated PDUs leave gaps it never fills) so later commands
                // reach the command paths instead of being ignored as out of window; an immediate NOP-Out must
                // always be answered while the connection is up.
                try
                {
                    await victim.PingAsync([]).WaitAsync(TimeSpan.FromSeconds(3));
                    victim.CmdSN = victim.ExpCmdSN;
                    stats.Count("resync");
                    if (i < count - 1 && rng.Next(2) == 0)
                    {
                        // A well-formed command amid the garbage, with real R2T and Data-Out handling.
                        uint lba = (uint)rng.Next(0, 90_000);
                        ushort blocks = (ushort)rng.Next(1, 257);
                        var command = rng.Next(2) == 0
                            ? ($"write {lba}+{blocks}", victim.ExecuteAsync(Cdb.Write10(lba, blocks), dataOut: Letters(rng, blocks * 512)))
                            : ($"read {lba}+{blocks}", victim.ExecuteAsync(Cdb.Read10(lba, blocks), expectedDataIn: blocks * 512));
                        legit.Add(command);
                        journal.Append("  well-formed ").AppendLine(command.Item1);
                    }
                }
                catch (TimeoutException)
                {
                    stats.Count("ping unanswered");
                    journal.AppendLine("  (an immediate NOP-Out went unanswered for 3 s)");
                    if (!victim.Closed) stats.Unanswered.Add(journal.ToString());
                }
                catch (IOException)
                {
                    break;   // closed meanwhile
                }
            }
            var bytes = generator.Next(last: i == count - 1, out string description, out bool twice);
            journal.Append("  pdu ").Append(i).Append(": ").AppendLine(description);
            try
            {
                await victim.SendRawAsync(bytes);
                if (twice) await victim.SendRawAsync(bytes);
            }
            catch (Exception e) when (e is IOException or InvalidOperationException or ObjectDisposedException or System.Net.Sockets.SocketException)
            {
                break;   // the target closed the connection: a legitimate answer to some of these
            }
            sent++;
            if (rng.Next(4) == 0) await Task.Delay(rng.Next(1, 8));
        }
        if (legit.Count > 0 && count == 1) await AssertLegitCommandsCompleteAsync(victim, legit, generator, stats);
        await Task.Delay(rng.Next(20, 120));
        stats.Count(victim.Closed ? "closed by the target (full feature)" : "left open (full feature)");
        victim.Abort();
        while (await victim.NextUnsolicitedAsync(TimeSpan.Zero) is { } pdu) stats.Received(pdu);
        return sent;
    }

    /// <summary>
    /// Every well-formed command the target admitted gets its answer (GOOD, CHECK CONDITION or a Reject) unless the
    /// connection goes away or the batch itself aborted tasks or logged out. Checked before the batch's last PDU,
    /// which may desynchronise the stream.
    /// </summary>
    private static async Task AssertLegitCommandsCompleteAsync(TestInitiator victim, List<(string What, Task<ScsiResult> Result)> legit,
        FullFeatureGenerator generator, FuzzStats stats)
    {
        if (generator.Disruptive)
        {
            stats.Count("well-formed commands not checked");
            return;
        }
        var all = Task.WhenAll(legit.Select(l => l.Result.ContinueWith(_ => 0, TaskScheduler.Default)));
        await Task.WhenAny(all, Task.Delay(TimeSpan.FromSeconds(5)));
        if (all.IsCompleted || victim.Closed || generator.Disruptive)
        {
            stats.Count(all.IsCompleted ? "well-formed commands answered" : "well-formed commands not checked");
            return;
        }
        var missing = legit.Where(l => !l.Result.IsCompleted).Select(l => l.What);
        Assert.Fail($"well-formed commands got no answer within 5 s on a live connection: {string.Join(", ", missing)}");
    }

    // ---------------------------------------------------------------- generators

    private static byte[] Letters(Random rng, int length)
    {
        var bytes = new byte[length];
        for (int i = 0; i < length; i++) bytes[i] = (byte)('a' + rng.Next(26));
        return bytes;
    }

    private static T Pick<T>(Random rng, params T[] choices) => choices[rng.Next(choices.Length)];

    /// <summary>Header mutations that keep the framing (lengths are written afterwards).</summary>
    private static string MutateHeader(Random rng, byte[] header, ref byte[] data, ref byte[] ahs)
    {
        switch (rng.Next(13))
        {
            case 0:
            {
                int at = rng.Next(48);
                header[at] ^= (byte)(1 << rng.Next(8));
                return $"flip@{at}";
            }
            case 1:
            {
                int at = rng.Next(48);
                header[at] = (byte)rng.Next(256);
                return $"byte@{at}";
            }
            case 2:
                header[0] = (byte)((header[0] & 0x40) | rng.Next(64));
                return "opcode";
            case 3:
                header[0] ^= 0x40;
                return "immediate";
            case 4:
                header[1] = (byte)rng.Next(256);
                return "flags";
            case 5:
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24),
                    Pick(rng, 0u, 0xFFFFFFFFu, (uint)rng.Next(), BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(24)) + (uint)rng.Next(-3, 300)));
                return "cmdsn";
            case 6:
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(16), Pick(rng, 0u, 0xFFFFFFFFu, (uint)rng.Next()));
                return "itt";
            case 7:
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), Pick(rng, 0u, 0xFFFFFFFFu, (uint)rng.Next(), (uint)rng.Next(1 << 24)));
                return "field20";
            case 8:
                BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(8), Pick(rng, 0UL, (ulong)rng.NextInt64(), 1UL << 48, 0x4001UL << 48));
                return "lun";
            case 9:
                for (int i = 32; i < 48; i++) if (rng.Next(3) == 0) header[i] = (byte)rng.Next(256);
                return "cdb";
            case 10:
                data = Letters(rng, Pick(rng, 0, 1, 3, 511, 4096, rng.Next(20000)));
                return $"data={data.Length}";
            case 11:
            {
                int words = Pick(rng, 1, 2, 5, 63, 64, 65, rng.Next(1, 256));
                ahs = new byte[words * 4];
                rng.NextBytes(ahs);
                if (rng.Next(2) == 0) { ahs[0] = 0; ahs[1] = (byte)(words * 4 - 3); ahs[2] = (byte)rng.Next(4); }
                return $"ahs={words}w";
            }
            default:
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(28), (uint)rng.Next());
                return "expstatsn";
        }
    }

    /// <summary>
    /// Keeps the fuzzed session from doing what legitimately affects other initiators: target or LU resets and
    /// task set clears, and every SCSI command but harmless reads and writes far from the bystander's blocks.
    /// </summary>
    private static void Sanitize(byte[] header)
    {
        int opcode = header[0] & 0x3F;
        if (opcode == 0x02 && (header[1] & 0x7F) is >= 4 and <= 7)
            header[1] = (byte)((header[1] & 0x80) | 0x01);
        if (opcode != 0x01) return;
        var cdb = header.AsSpan(32, 16);
        switch (cdb[0])
        {
            case 0x00 or 0x03 or 0x12 or 0x1A or 0x25 or 0x5A or 0x5E or 0xA0 or 0xA3 or 0x37 or 0xB7 or 0x84:
                break;   // reports and sense: read only
            case 0x9E:
                cdb[1] = (byte)(0x10 | (cdb[1] & 0xE0));
                break;
            case 0x28 or 0x2F:
                if (BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(7)) > 2048) BinaryPrimitives.WriteUInt16BigEndian(cdb.Slice(7), 2048);
                break;
            case 0x88:
                if (BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(10)) > 2048) BinaryPrimitives.WriteUInt32BigEndian(cdb.Slice(10), 2048);
                break;
            case 0x2A:
                BinaryPrimitives.WriteUInt32BigEndian(cdb.Slice(2), BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(2)) % 90_000);
                if (BinaryPrimitives.ReadUInt16BigEndian(cdb.Slice(7)) > 2048) BinaryPrimitives.WriteUInt16BigEndian(cdb.Slice(7), 2048);
                break;
            case 0x8A:
                BinaryPrimitives.WriteUInt64BigEndian(cdb.Slice(2), BinaryPrimitives.ReadUInt64BigEndian(cdb.Slice(2)) % 90_000);
                if (BinaryPrimitives.ReadUInt32BigEndian(cdb.Slice(10)) > 2048) BinaryPrimitives.WriteUInt32BigEndian(cdb.Slice(10), 2048);
                break;
            default:
                cdb[0] = (byte)(0xC0 | (cdb[0] & 0x0F));   // vendor specific: not implemented, INVALID COMMAND OPERATION CODE
                break;
        }
    }

    /// <summary>Length lies, truncation or trailing garbage, only on a batch's last PDU (they desynchronise the stream).</summary>
    private static byte[] Desynchronise(Random rng, byte[] header, byte[] data, byte[] ahs, bool headerDigest, bool dataDigest,
        byte[] framed, int maxDataSegment, List<string> applied)
    {
        switch (rng.Next(9))
        {
            case 0:
            {
                int lie = Pick(rng, 0, 1, Math.Max(0, data.Length - 1), data.Length + 1, data.Length + 100, maxDataSegment, maxDataSegment + 1,
                    (16 << 20) - 1, rng.Next(1 << 24));
                FuzzPdu.SetDataSegmentLength(header, lie);
                applied.Add($"dsl-lie={lie}");
                return FuzzPdu.Frame(header, data, ahs, headerDigest, dataDigest, setLengths: false);
            }
            case 1:
            {
                header[4] = (byte)Pick(rng, 1, 2, 3, 63, 64, 65, 255, rng.Next(256));
                applied.Add($"ahs-lie={header[4]}w");
                return FuzzPdu.Frame(header, data, ahs, headerDigest, dataDigest, setLengths: false);
            }
            case 2:
            {
                int keep = rng.Next(1, framed.Length);
                applied.Add($"truncate={keep}/{framed.Length}");
                return framed[..keep];
            }
            case 3:
            {
                var garbage = Letters(rng, rng.Next(1, 300));
                applied.Add($"garbage={garbage.Length}");
                return [.. framed, .. garbage];
            }
            default:
                return framed;
        }
    }

    private static string Describe(byte[] header, int sent, List<string> mutations) =>
        $"op 0x{header[0]:x2} flags 0x{header[1]:x2} itt 0x{BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(16)):x8} " +
        $"cmdsn {BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(24))} ahs {header[4]}w dsl {(header[5] << 16) | (header[6] << 8) | header[7]} " +
        $"sent {sent} [{string.Join(' ', mutations)}] bhs {Convert.ToHexString(header)}";

    /// <summary>Login requests: valid-looking stages and keys, then mutated.</summary>
    private sealed class LoginGenerator(Random rng)
    {
        private readonly ulong _isid = 0x400000000000UL | (ulong)rng.NextInt64(1, 0xFFFFFFFFFF);
        private readonly uint _itt = (uint)rng.Next();

        private static readonly string[] Numbers = ["0", "1", "512", "8192", "65536", "262144", "16777215", "16777216", "4294967296", "-1",
            "99999999999999999999", "abc", "", "0x10", "1,2"];

        private string Key()
        {
            string number = Pick(rng, Numbers);
            return rng.Next(24) switch
            {
                0 => "InitiatorName=" + Pick(rng, FuzzPdu.FuzzInitiator, "iqn.2026-11.x:" + new string('n', rng.Next(300)), "", "eui.0123456789ABCDEF"),
                1 or 2 => "TargetName=" + Pick(rng, InProcessTarget.TargetName, InProcessTarget.TargetName, "iqn.2026-11.x:nothing", ""),
                3 => "SessionType=" + Pick(rng, "Normal", "Discovery", "Bogus", ""),
                4 => "AuthMethod=" + Pick(rng, "None", "CHAP", "CHAP,None", "Bogus", "None,None", ""),
                5 => "CHAP_A=" + Pick(rng, "5", "7,5", "999", ""),
                6 => "CHAP_N=" + Pick(rng, "user", ""),
                7 => "CHAP_R=" + Pick(rng, "0x00", "0xZZ", "", "0x" + new string('A', rng.Next(600))),
                8 => "HeaderDigest=" + Pick(rng, "CRC32C,None", "None", "CRC32C", "Bogus", ""),
                9 => "DataDigest=" + Pick(rng, "CRC32C,None", "None", "Bogus"),
                10 => "MaxRecvDataSegmentLength=" + number,
                11 => "MaxBurstLength=" + number,
                12 => "FirstBurstLength=" + number,
                13 => "ImmediateData=" + Pick(rng, "Yes", "No", "Maybe", ""),
                14 => "InitialR2T=" + Pick(rng, "Yes", "No", "Maybe"),
                15 => "MaxOutstandingR2T=" + number,
                16 => "MaxConnections=" + number,
                17 => "ErrorRecoveryLevel=" + number,
                18 => "DefaultTime2Wait=" + number,
                19 => "DataPDUInOrder=" + Pick(rng, "Yes", "No", "?"),
                20 => "X-com.example.fuzz=" + number,
                21 => Pick(rng, "IFMarker=Yes", "OFMarkInt=1~65535", "TaskReporting=RFC3720", "TargetAlias=x", "TargetPortalGroupTag=1", "SendTargets=All"),
                22 => Encoding.ASCII.GetString(Letters(rng, rng.Next(1, 40))),
                _ => "InitiatorAlias=" + number,
            };
        }

        public byte[] Next(bool last, out string description)
        {
            var mutations = new List<string>();
            byte flags = rng.Next(5) switch
            {
                0 => FuzzPdu.LoginFlags(true, 1, 3),
                1 => FuzzPdu.LoginFlags(true, 0, 1),
                2 => FuzzPdu.LoginFlags(true, 0, 3),
                3 => FuzzPdu.LoginFlags(false, rng.Next(2), 0, @continue: rng.Next(3) == 0),
                _ => (byte)rng.Next(256),
            };
            var header = FuzzPdu.LoginHeader(flags, itt: _itt, versionMax: (byte)(rng.Next(10) == 0 ? rng.Next(256) : 0),
                versionMin: (byte)(rng.Next(10) == 0 ? rng.Next(256) : 0), immediate: rng.Next(12) != 0,
                tsih: (ushort)(rng.Next(12) == 0 ? rng.Next(65536) : 0), isid: _isid, cmdSN: 1, cid: (ushort)rng.Next(2));
            var keys = new List<string>();
            if (rng.Next(3) != 0) keys.AddRange(FuzzPdu.GoodLoginKeys);
            for (int n = rng.Next(6); n > 0; n--) keys.Insert(rng.Next(keys.Count + 1), Key());
            byte[] data = rng.Next(10) switch
            {
                0 => Letters(rng, rng.Next(0, 9000)),
                1 => [.. FuzzPdu.Text([.. keys]).AsSpan(0, Math.Max(0, FuzzPdu.Text([.. keys]).Length - 1))],   // no final NUL
                _ => FuzzPdu.Text([.. keys]),
            };
            if (data.Length > 8192 && rng.Next(2) == 0) data = data[..8192];
            byte[] ahs = [];
            if (rng.Next(5) < 2)
                for (int m = rng.Next(1, 4); m > 0; m--) mutations.Add(MutateHeader(rng, header, ref data, ref ahs));
            Sanitize(header);   // a login that succeeded earlier in the batch puts these PDUs in full feature phase
            var framed = FuzzPdu.Frame(header, data, ahs);
            if (last) framed = Desynchronise(rng, header, data, ahs, false, false, framed, 8192, mutations);
            description = Describe(header, framed.Length, mutations) + $" keys {string.Join('|', keys.Take(8))}";
            return framed;
        }
    }

    /// <summary>Full feature phase PDUs for one session: mostly valid with its sequence numbers and tags, then mutated.</summary>
    private sealed class FullFeatureGenerator
    {
        private readonly Random _rng;
        private readonly TestInitiator _victim;
        private readonly bool _headerDigest, _dataDigest, _immediateData, _initialR2T;
        private readonly int _firstBurst, _maxSegment;
        private uint _lastItt;
        private uint _writeItt = 0xFFFFFFFF;
        private int _writeLength, _writeOffset;
        private uint _writeDataSN;

        /// <summary>A PDU went out that may legitimately end other tasks of the session (ABORT TASK SET, Logout).</summary>
        public bool Disruptive { get; private set; }

        public FullFeatureGenerator(Random rng, TestInitiator victim)
        {
            _rng = rng;
            _victim = victim;
            var keys = victim.NegotiatedKeys;
            _headerDigest = keys.GetValueOrDefault("HeaderDigest") == "CRC32C";
            _dataDigest = keys.GetValueOrDefault("DataDigest") == "CRC32C";
            _immediateData = keys.GetValueOrDefault("ImmediateData") == "Yes";
            _initialR2T = keys.GetValueOrDefault("InitialR2T") == "Yes";
            // FirstBurstLength is "Irrelevant" when InitialR2T=Yes and ImmediateData=No.
            _firstBurst = int.TryParse(keys.GetValueOrDefault("FirstBurstLength"), out int firstBurst) ? firstBurst : 65536;
            _maxSegment = int.TryParse(keys.GetValueOrDefault("MaxRecvDataSegmentLength"), out int maxSegment) ? maxSegment : 8192;
            _lastItt = victim.NextItt();
        }

        private uint Itt() => _rng.Next(5) == 0 ? _lastItt : _lastItt = _victim.NextItt();

        private uint CmdSN(bool immediate) => immediate ? _victim.CmdSN : _victim.CmdSN++;

        public byte[] Next(bool last, out string description, out bool twice)
        {
            var rng = _rng;
            byte[] header;
            byte[] data = [];
            byte[] ahs = [];
            int kind = rng.Next(100);
            string what;
            if (kind < 40)
            {
                what = "scsi";
                header = ScsiCommand(out data);
            }
            else if (kind < 60)
            {
                what = "data-out";
                header = DataOut(out data);
            }
            else if (kind < 74)
            {
                what = "nop-out";
                uint itt = rng.Next(4) == 0 ? 0xFFFFFFFF : Itt();
                bool immediate = itt == 0xFFFFFFFF || rng.Next(2) == 0;
                header = _victim.NewHeader(0x00, 0x80, itt, immediate);
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), 0xFFFFFFFF);
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), CmdSN(immediate));
                data = Letters(rng, rng.Next(0, Math.Min(2048, _maxSegment)));
            }
            else if (kind < 84)
            {
                what = "text";
                bool immediate = rng.Next(3) != 0;
                header = _victim.NewHeader(0x04, (byte)(rng.Next(5) == 0 ? 0x40 : 0x80), Itt(), immediate);
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), rng.Next(5) == 0 ? (uint)rng.Next() : 0xFFFFFFFF);
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), CmdSN(immediate));
                string pair = Pick(rng, "SendTargets=All", "SendTargets=", "SendTargets=" + InProcessTarget.TargetName, "MaxBurstLength=65536",
                    "MaxRecvDataSegmentLength=4096", "HeaderDigest=CRC32C", "X-com.example.fuzz=1", "InitialR2T=Yes", "ErrorRecoveryLevel=2", "garbage", "=x");
                data = rng.Next(6) == 0 ? Letters(rng, rng.Next(1, 600)) : FuzzPdu.Text(pair);
            }
            else if (kind < 93)
            {
                what = "tmf";
                byte function = (byte)Pick(rng, 1, 1, 2, 3, 8, rng.Next(9, 128));
                header = _victim.NewHeader(0x02, (byte)(0x80 | function), Itt(), immediate: rng.Next(4) != 0);
                BinaryPrimitives.WriteUInt64BigEndian(header.AsSpan(8), TestInitiator.EncodeLun((ulong)Pick(rng, 0, 0, 1, 300)));
                BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(20), Pick(rng, _writeItt, _lastItt, 0xFFFFFFFF, (uint)rng.Next()));
                if ((header[0] & 0x40) == 0) BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), CmdSN(false));
            }
            else if (kind < 98)
            {
                byte opcode = (byte)Pick(rng, 0x10, 0x03, rng.Next(0x07, 0x10), rng.Next(0x11, 0x40));
                what = $"odd-0x{opcode:x2}";
                header = _victim.NewHeader(opcode, 0x80, Itt(), immediate: rng.Next(2) == 0);
                if (rng.Next(2) == 0) data = Letters(rng, rng.Next(0, 300));
            }
            else
            {
                what = "logout";
                header = _victim.NewHeader(0x06, (byte)(0x80 | Pick(rng, 0, 1, 2, rng.Next(128))), Itt(), immediate: true);
                BinaryPrimitives.WriteUInt16BigEndian(header.AsSpan(20), (ushort)Pick(rng, 0, 0, rng.Next(65536)));
            }

            var mutations = new List<string>();
            if (rng.Next(100) < 55)
                for (int m = rng.Next(1, 4); m > 0; m--) mutations.Add(MutateHeader(rng, header, ref data, ref ahs));
            Sanitize(header);
            int finalOpcode = header[0] & 0x3F;
            // ABORT TASK names one task by ITT, never one of the well-formed commands; ABORT TASK SET and Logout end them all.
            if ((finalOpcode == 0x02 && (header[1] & 0x7F) == 2) || finalOpcode == 0x06) Disruptive = true;
            bool badHeaderDigest = _headerDigest && rng.Next(25) == 0;
            bool badDataDigest = _dataDigest && data.Length > 0 && rng.Next(10) == 0;
            if (badHeaderDigest) mutations.Add("bad-header-digest");
            if (badDataDigest) mutations.Add("bad-data-digest");
            var framed = FuzzPdu.Frame(header, data, ahs, _headerDigest, _dataDigest, badHeaderDigest, badDataDigest);
            if (last) framed = Desynchronise(rng, header, data, ahs, _headerDigest, _dataDigest, framed, _maxSegment, mutations);
            twice = !last && rng.Next(15) == 0;
            if (twice) mutations.Add("sent-twice");
            description = $"{what} " + Describe(header, framed.Length, mutations);
            return framed;
        }

        private byte[] ScsiCommand(out byte[] data)
        {
            var rng = _rng;
            data = [];
            uint lba = (uint)rng.Next(0, 90_000);
            ushort blocks = (ushort)rng.Next(1, 65);
            byte[] cdb;
            bool read = false, write = false;
            uint expected = 0;
            switch (rng.Next(10))
            {
                case 0: cdb = Cdb.TestUnitReady(); break;
                case 1: { ushort allocation = (ushort)rng.Next(0, 600); cdb = Cdb.Inquiry(allocation: allocation); read = true; expected = allocation; break; }
                case 2: cdb = Cdb.ReadCapacity16(); read = true; expected = 32; break;
                case 3: cdb = Cdb.ReportLuns(); read = true; expected = 16; break;
                case 4: cdb = Cdb.RequestSense(); read = true; expected = 252; break;
                case 5: case 6: cdb = Cdb.Read10(lba, blocks); read = true; expected = blocks * 512u; break;
                default: cdb = rng.Next(2) == 0 ? Cdb.Write10(lba, blocks) : Cdb.Write16(lba, blocks); write = true; expected = blocks * 512u; break;
            }
            if (rng.Next(8) == 0) expected = (uint)Pick(rng, 0, 1, 511, (int)expected + 512, rng.Next(1 << 21));
            bool immediate = rng.Next(8) == 0;
            bool final = !(write && !_initialR2T && rng.Next(2) == 0);
            uint itt = Itt();
            var header = FuzzPdu.ScsiCommand(_victim, itt, cdb, expected, read, write, final, immediate);
            BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(24), CmdSN(immediate));
            if (write)
            {
                if (_immediateData || rng.Next(6) == 0)
                {
                    int length = (int)Math.Min(expected, (uint)Math.Min(_firstBurst, _maxSegment));
                    if (rng.Next(4) == 0) length = rng.Next(0, length + 1);
                    data = Letters(rng, length);
                }
                _writeItt = itt;
                _writeLength = (int)Math.Min(expected, 1u << 21);
                _writeOffset = data.Length;
                _writeDataSN = 0;
            }
            return header;
        }

        private byte[] DataOut(out byte[] data)
        {
            var rng = _rng;
            uint itt = rng.Next(4) == 0 ? (uint)rng.Next() : _writeItt;
            uint ttt = rng.Next(5) < 3 ? 0xFFFFFFFF : Pick(rng, 0u, 1u, (uint)rng.Next());
            int length = Math.Min(Math.Max(0, _writeLength - _writeOffset), Math.Min(_maxSegment, _firstBurst));
            if (rng.Next(4) == 0) length = rng.Next(0, Math.Min(_maxSegment, 16384) + 1);
            uint dataSN = rng.Next(5) == 0 ? (uint)rng.Next(4) : _writeDataSN;
            uint offset = rng.Next(5) == 0 ? (uint)rng.Next(0, 64) * 512 : (uint)_writeOffset;
            bool final = rng.Next(3) != 0 || _writeOffset + length >= _writeLength;
            var header = FuzzPdu.DataOut(_victim, itt, ttt, dataSN, offset, final);
            data = Letters(rng, length);
            _writeOffset += length;
            _writeDataSN++;
            return header;
        }
    }
}

/// <summary>What the target answered over a seed's batches, to see that the fuzzing reaches the interesting paths.</summary>
internal sealed class FuzzStats
{
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, int> _counts = new();

    /// <summary>Journals of batches where an open connection did not answer an immediate ping.</summary>
    public System.Collections.Concurrent.ConcurrentBag<string> Unanswered { get; } = new();

    public void Count(string what) => _counts.AddOrUpdate(what, 1, (_, n) => n + 1);

    public void Received(ReceivedPdu pdu) => Count(pdu.Opcode switch
    {
        0x3F => $"Reject 0x{pdu.Header[2]:x2}",
        0x21 => $"SCSI Response status 0x{pdu.Header[3]:x2}",
        0x23 => $"Login Response 0x{pdu.Header[36]:x2}{pdu.Header[37]:x2}",
        byte other => $"opcode 0x{other:x2}",
    });

    public override string ToString() => string.Join(", ", _counts.OrderBy(c => c.Key, StringComparer.Ordinal).Select(c => $"{c.Key}: {c.Value}"));
}

/// <summary>A fuzz batch failed: the message carries the seed, the batch and the PDUs sent, to replay it.</summary>
public sealed class FuzzFailureException(string message, Exception inner) : Exception(message, inner);
