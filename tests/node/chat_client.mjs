// An outside client of the orchestrator, as a JavaScript user writes one: stubs from protos/ only,
// no deadline (the gRPC default), strings as JavaScript holds them (UTF-16, lone surrogates included).
//
//   node chat_client.mjs ADDRESS SCENARIO      SCENARIO: no-deadline | cancel | lone-surrogate
//
// Prints one JSON object: the events it saw and how the call ended ({code, details}).
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
const call = client.Chat({ message, params: { max_new_tokens: scenario === "cancel" ? 400 : 8, temperature: 0 } });

const events = [];
call.on("data", (response) => {
  events.push(response.event);
  if (scenario === "cancel" && response.event === "delta") call.cancel();
});
call.on("error", () => {}); // the status below says it all
call.on("status", (status) => {
  console.log(JSON.stringify({ events, code: grpc.status[status.code], details: status.details }));
  client.close();
});
