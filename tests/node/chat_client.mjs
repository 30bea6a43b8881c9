// An outside client of the orchestrator, as a JavaScript user writes one: stubs from protos/ only,
// no deadline (the gRPC default), strings as JavaScript holds them (UTF-16, lone surrogates included).
//
//   node chat_client.mjs ADDRESS SCENARIO      SCENARIO: no-deadline | cancel | lone-surrogate | choice | tools
//
// Prints one JSON object: the events it saw, the tool call pieces (tools) and how the call ended ({code, details}).
// choice: the answer constrained to one of two strings (params.constraint, a oneof); tools: a required call.
import path from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const protos = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../protos");
const definition = protoLoader.loadSync("nightcap/v1/chat.proto", { includeDirs: [protos], longs: Number, oneofs: true });
const nightcap = grpc.loadPackageDefinition(definition).nightcap.v1;

const [address, scenario] = process.argv.slice(2);
const client = new nightcap.Chat(address, grpc.credentials.createInsecure());
const message = scenario === "lone-surrogate" ? "Where is Zurich?\uD800" : "Where is Zurich?";
const params = { max_new_tokens: scenario === "cancel" ? 400 : 8, temperature: 0 };
if (scenario === "choice") params.constraint = { choice: { options: ["yes", "no"] } };
const request = { message, params };
if (scenario === "tools") {
  const parameters = { type: "object", properties: { city: { type: "string" } }, required: ["city"] };
  request.tools = [{ name: "get_weather", description: "The weather now", parameters: JSON.stringify(parameters) }];
  request.toolChoice = { mode: "MODE_REQUIRED" };
}
const call = client.Chat(request);

const events = [];
const toolCalls = [];
call.on("data", (response) => {
  events.push(response.event);
  if (response.event === "toolCall") toolCalls.push(response.toolCall);
  if (scenario === "cancel" && response.event === "delta") call.cancel();
});
call.on("error", () => {}); // the status below says it all
call.on("status", (status) => {
  console.log(JSON.stringify({ events, toolCalls, code: grpc.status[status.code], details: status.details }));
  client.close();
});
