using System.Security.Cryptography;

namespace ISCSISnap.Target.Iscsi.Login;

/// <summary>A CHAP hash algorithm with its CHAP_A code (RFC 7143 §12.1.3 and the SHA-family registrations).</summary>
public sealed class ChapAlgorithm
{
    private readonly Func<byte[], byte[]> _hash;

    private ChapAlgorithm(int code, string name, int digestLength, Func<byte[], byte[]> hash, Func<bool> isSupported)
    {
        Code = code;
        Name = name;
        DigestLength = digestLength;
        _hash = hash;
        IsSupported = isSupported();
    }

    public int Code { get; }
    public string Name { get; }
    public int DigestLength { get; }
    public bool IsSupported { get; }

    public static readonly ChapAlgorithm Md5 = new(5, "MD5", 16, MD5.HashData, () => true);
    public static readonly ChapAlgorithm Sha1 = new(6, "SHA-1", 20, SHA1.HashData, () => true);
    public static readonly ChapAlgorithm Sha256 = new(7, "SHA-256", 32, SHA256.HashData, () => true);
    public static readonly ChapAlgorithm Sha3_256 = new(8, "SHA3-256", 32, SHA3_256.HashData, () => SHA3_256.IsSupported);

    /// <summary>All algorithms, strongest first.</summary>
    public static IReadOnlyList<ChapAlgorithm> All { get; } = [Sha3_256, Sha256, Sha1, Md5];

    public static ChapAlgorithm? FromName(string name) =>
        All.FirstOrDefault(a => string.Equals(a.Name, name, StringComparison.OrdinalIgnoreCase));

    public static ChapAlgorithm? FromCode(int code) => All.FirstOrDefault(a => a.Code == code);

    /// <summary>CHAP response: H(identifier || secret || challenge).</summary>
    public byte[] Response(byte identifier, ReadOnlySpan<byte> secret, ReadOnlySpan<byte> challenge)
    {
        var input = new byte[1 + secret.Length + challenge.Length];
        input[0] = identifier;
        secret.CopyTo(input.AsSpan(1));
        challenge.CopyTo(input.AsSpan(1 + secret.Length));
        try
        {
            return _hash(input);
        }
        finally
        {
            CryptographicOperations.ZeroMemory(input);
        }
    }
}
