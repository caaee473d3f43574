using System.Buffers;
using System.Globalization;
using ISCSISnap.Storage.Filters;

namespace ISCSISnap.SamplePlugin;

/// <summary>
/// A sample plugin filter that scrambles data at rest: writes go down XORed with a key byte, reads come back up
/// XORed again. Not encryption; it shows a plugin transforming data both ways through syscalls only.
/// Settings: "key" (1-255).
/// </summary>
public sealed class XorFilter : IIoFilter
{
    private readonly byte _key;

    public XorFilter(IReadOnlyDictionary<string, string> settings)
    {
        if (!settings.TryGetValue("key", out var text) || !byte.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out _key) || _key == 0)
            throw new ArgumentException("setting 'key' must be a number from 1 to 255");
    }

    public string Name => "xor";

    public ValueTask<FilterVerdict> OnReadAsync(Upcall upcall)
    {
        if (upcall.Phase == FilterPhase.Before) return new(FilterVerdict.Transform);
        Xor(upcall.ReadBuffer.Span);
        upcall.Syscalls.Count("unscrambled_bytes", upcall.ReadBuffer.Length);
        return new(FilterVerdict.Pass);
    }

    public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall)
    {
        var data = upcall.WriteData;
        var scratch = upcall.Syscalls.Allocate((int)data.Length);
        data.CopyTo(scratch.Memory.Span);
        Xor(scratch.Memory.Span);
        upcall.Syscalls.ReplaceWriteData(scratch);
        upcall.Syscalls.Count("scrambled_bytes", data.Length);
        return new(FilterVerdict.Transform);
    }

    private void Xor(Span<byte> data)
    {
        for (int i = 0; i < data.Length; i++) data[i] ^= _key;
    }
}

/// <summary>A plugin filter that always throws: the engine must contain it by its failure policy.</summary>
public sealed class ThrowingFilter : IIoFilter
{
    public string Name => "thrower";
    public ValueTask<FilterVerdict> OnReadAsync(Upcall upcall) => throw new InvalidOperationException("this filter always throws");
    public ValueTask<FilterVerdict> OnWriteAsync(Upcall upcall) => throw new InvalidOperationException("this filter always throws");
}
