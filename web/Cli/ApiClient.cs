using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace ISCSISnap.Web.Cli;

/// <summary>The CLI's side of the REST API: sends a request, prints the answer (or the problem detail naming the fault) and says whether it succeeded.</summary>
internal sealed class ApiClient(HttpClient http, TextWriter stdout, TextWriter stderr)
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public async Task<int> PrintAsync(HttpMethod method, string path, JsonObject? body, Action<JsonNode, TextWriter>? format)
    {
        var (ok, node) = await SendAsync(method, path, body);
        if (!ok) return 1;
        if (node is null) return 0;
        if (format is not null) format(node, stdout);
        else stdout.WriteLine(node.ToJsonString(Indented));
        return 0;
    }

    /// <summary>Starts a job; with <paramref name="wait"/> follows it to the end, printing progress to stderr.</summary>
    public async Task<int> JobAsync(HttpMethod method, string path, JsonObject? body, bool wait)
    {
        var (ok, node) = await SendAsync(method, path, body);
        if (!ok || node is null) return ok ? 0 : 1;
        if (!wait)
        {
            stdout.WriteLine(node.ToJsonString(Indented));
            return 0;
        }
        string id = node["id"]!.GetValue<string>();
        while (true)
        {
            var (got, job) = await SendAsync(HttpMethod.Get, $"/api/v1/jobs/{id}", null);
            if (!got || job is null) return 1;
            string state = job["state"]!.GetValue<string>();
            if (state != "Running")
            {
                stdout.WriteLine(job.ToJsonString(Indented));
                if (state == "Succeeded") return 0;
                stderr.WriteLine($"iscsisnap: {job["description"]}: {state}: {job["error"]}");
                return 1;
            }
            stderr.Write($"\r{job["description"]}: {job["progress"]!.GetValue<double>() * 100:0}%   ");
            await Task.Delay(500);
        }
    }

    private async Task<(bool Ok, JsonNode? Node)> SendAsync(HttpMethod method, string path, JsonObject? body)
    {
        using var request = new HttpRequestMessage(method, path);
        if (body is not null) request.Content = new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json");
        using var response = await http.SendAsync(request);
        string text = await response.Content.ReadAsStringAsync();
        JsonNode? node = null;
        if (text.Length > 0)
        {
            try
            {
                node = JsonNode.Parse(text);
            }
            catch (JsonException)
            {
                node = null;
            }
        }
        if (response.IsSuccessStatusCode) return (true, node);
        string detail = node?["detail"]?.GetValue<string>() ?? text;
        string field = node?["field"]?.GetValue<string>() is { } f ? $" (field {f})" : "";
        stderr.WriteLine($"iscsisnap: {(int)response.StatusCode} {node?["title"]?.GetValue<string>() ?? response.ReasonPhrase}: {detail}{field}");
        return (false, node);
    }
}
