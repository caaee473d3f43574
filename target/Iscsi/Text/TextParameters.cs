using System.Text;

namespace ISCSISnap.Target.Iscsi.Text;

/// <summary>
/// The key=value pairs of a Login or Text data segment (RFC 7143 §6.1): UTF-8, each pair NUL-terminated.
/// Order is kept because list negotiation and key-repeat detection depend on it.
/// </summary>
public sealed class TextParameters
{
    public const int MaxKeyLength = 63;
    public const int MaxValueLength = 8192 * 2 + 2;   // long binary values (CHAP) may be this large

    private readonly List<KeyValuePair<string, string>> _pairs = new();

    public IReadOnlyList<KeyValuePair<string, string>> Pairs => _pairs;
    public int Count => _pairs.Count;

    public void Add(string key, string value) => _pairs.Add(new(key, value));

    public string? this[string key]
    {
        get
        {
            foreach (var pair in _pairs)
                if (pair.Key == key) return pair.Value;
            return null;
        }
    }

    /// <summary>Parses NUL-separated key=value pairs. Returns false with a reason on malformed text.</summary>
    public static bool TryParse(ReadOnlySpan<byte> data, out TextParameters parameters, out string? fault)
    {
        parameters = new TextParameters();
        fault = null;
        // Trailing NUL padding is allowed; an unterminated last pair is tolerated only if non-empty.
        while (!data.IsEmpty)
        {
            int end = data.IndexOf((byte)0);
            ReadOnlySpan<byte> pair = end < 0 ? data : data.Slice(0, end);
            data = end < 0 ? ReadOnlySpan<byte>.Empty : data.Slice(end + 1);
            if (pair.IsEmpty) continue;
            int equals = pair.IndexOf((byte)'=');
            if (equals <= 0)
            {
                fault = $"malformed key=value text '{Printable(pair)}'";
                return false;
            }
            if (equals > MaxKeyLength)
            {
                fault = $"key longer than {MaxKeyLength} bytes";
                return false;
            }
            var keyBytes = pair.Slice(0, equals);
            foreach (byte b in keyBytes)
            {
                bool ok = b is >= (byte)'a' and <= (byte)'z' or >= (byte)'A' and <= (byte)'Z' or >= (byte)'0' and <= (byte)'9'
                    or (byte)'.' or (byte)'-' or (byte)'+' or (byte)'@' or (byte)'_';
                if (!ok)
                {
                    fault = $"key '{Printable(keyBytes)}' has an invalid character";
                    return false;
                }
            }
            var valueBytes = pair.Slice(equals + 1);
            if (valueBytes.Length > MaxValueLength)
            {
                fault = $"value of {Encoding.ASCII.GetString(keyBytes)} is longer than {MaxValueLength} bytes";
                return false;
            }
            string value;
            try
            {
                value = new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(valueBytes);
            }
            catch (DecoderFallbackException)
            {
                fault = $"value of {Encoding.ASCII.GetString(keyBytes)} is not valid UTF-8";
                return false;
            }
            parameters._pairs.Add(new(Encoding.ASCII.GetString(keyBytes), value));
        }
        return true;
    }

    /// <summary>Encodes the pairs as NUL-terminated UTF-8 key=value text.</summary>
    public byte[] Encode()
    {
        int length = 0;
        foreach (var pair in _pairs) length += Encoding.UTF8.GetByteCount(pair.Key) + Encoding.UTF8.GetByteCount(pair.Value) + 2;
        var bytes = new byte[length];
        int offset = 0;
        foreach (var pair in _pairs)
        {
            offset += Encoding.UTF8.GetBytes(pair.Key, bytes.AsSpan(offset));
            bytes[offset++] = (byte)'=';
            offset += Encoding.UTF8.GetBytes(pair.Value, bytes.AsSpan(offset));
            bytes[offset++] = 0;
        }
        return bytes;
    }

    private static string Printable(ReadOnlySpan<byte> bytes)
    {
        var sb = new StringBuilder();
        foreach (byte b in bytes[..Math.Min(bytes.Length, 64)])
            sb.Append(b is >= 0x20 and < 0x7f ? (char)b : '?');
        return sb.ToString();
    }
}
