namespace ISCSISnap.Web.Appliance;

/// <summary>A request the appliance refuses: an HTTP status, the field at fault and why. The API turns it into problem+json.</summary>
public sealed class ApplianceError : Exception
{
    public ApplianceError(int status, string title, string detail, string? field = null) : base(detail)
    {
        Status = status;
        Title = title;
        Field = field;
    }

    public int Status { get; }
    public string Title { get; }
    public string? Field { get; }

    public static ApplianceError Invalid(string field, string detail) => new(400, "Invalid request", detail, field);
    public static ApplianceError NotFound(string what) => new(404, "Not found", what);
    public static ApplianceError Conflict(string detail, string? field = null) => new(409, "Conflict", detail, field);
}
