using ISCSISnap.Web.Appliance;

namespace ISCSISnap.Web.Api;

/// <summary>Until authentication arrives, only loopback clients may manage the appliance.</summary>
public sealed class LoopbackOnlyMiddleware(RequestDelegate next, ILogger<LoopbackOnlyMiddleware> log)
{
    public async Task InvokeAsync(HttpContext context)
    {
        var remote = context.Connection.RemoteIpAddress;
        if (remote is not null && !System.Net.IPAddress.IsLoopback(remote) && !context.Request.Path.StartsWithSegments("/healthz"))
        {
            Log.NonLoopbackRefused(log, remote.ToString());
            await ProblemMiddleware.WriteProblemAsync(context, 403, "Forbidden",
                "the management API accepts loopback clients only until authentication is configured", null);
            return;
        }
        await next(context);
    }
}

/// <summary>Turns refused requests and unexpected failures into application/problem+json.</summary>
public sealed class ProblemMiddleware(RequestDelegate next, ILogger<ProblemMiddleware> log)
{
    public async Task InvokeAsync(HttpContext context)
    {
        try
        {
            await next(context);
            // Errors produced without a body (no route matched: 404, method not allowed: 405) are problems too.
            var response = context.Response;
            if (response.StatusCode >= 400 && !response.HasStarted && response.ContentType is null && response.ContentLength is null or 0)
            {
                response.ContentLength = null;
                await WriteProblemAsync(context, response.StatusCode,
                    Microsoft.AspNetCore.WebUtilities.ReasonPhrases.GetReasonPhrase(response.StatusCode) is { Length: > 0 } reason ? reason : "Error",
                    response.StatusCode switch
                    {
                        404 => $"there is nothing at {context.Request.Path}",
                        405 => $"{context.Request.Method} is not allowed on {context.Request.Path}",
                        _ => $"{context.Request.Method} {context.Request.Path} failed",
                    }, null);
            }
        }
        catch (ApplianceError e) when (!context.Response.HasStarted)
        {
            await WriteProblemAsync(context, e.Status, e.Title, e.Message, e.Field);
        }
        catch (BadHttpRequestException e) when (!context.Response.HasStarted)
        {
            await WriteProblemAsync(context, e.StatusCode, "Bad request", e.Message, null);
        }
        catch (Exception e) when (!context.Response.HasStarted && e is not OperationCanceledException)
        {
            log.LogError(e, "request {Method} {Path} failed", context.Request.Method, context.Request.Path);
            await WriteProblemAsync(context, 500, "Internal error", "the appliance could not complete the request; see its log", null);
        }
    }

    public static Task WriteProblemAsync(HttpContext context, int status, string title, string detail, string? field)
    {
        context.Response.StatusCode = status;
        var problem = new Dictionary<string, object?>
        {
            ["type"] = $"https://httpstatuses.io/{status}",
            ["title"] = title,
            ["status"] = status,
            ["detail"] = detail,
            ["instance"] = context.Request.Path.Value,
        };
        if (field is not null) problem["field"] = field;
        return context.Response.WriteAsJsonAsync(problem, (System.Text.Json.JsonSerializerOptions?)null, "application/problem+json");
    }
}
