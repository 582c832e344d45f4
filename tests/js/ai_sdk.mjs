// The AI SDK's openai-compatible provider against a Quorum gateway: `node ai_sdk.mjs BASE_URL MODEL`.
// Prints one JSON line per check: generateObject with a constrained zod schema, streamText, and a
// required tool call through generateText. Exits 1 on any error (its message on stderr).
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, streamText, tool } from "ai";
import { z } from "zod";

const [baseURL, modelId] = process.argv.slice(2);
const provider = createOpenAICompatible({ name: "quorum", baseURL, apiKey: "unused", supportsStructuredOutputs: true });
const model = provider(modelId);

const DayWeather = z.object({
  city: z.string().max(20),
  day: z.number().int().min(1).max(31),
  unit: z.enum(["celsius", "fahrenheit"]),
});

const object = await generateObject({
  model, schema: DayWeather, temperature: 0, maxOutputTokens: 80,
  prompt: "The weather in Paris on the 14th, in celsius.",
});
console.log(JSON.stringify({ check: "generateObject", object: object.object, finishReason: object.finishReason }));

const stream = streamText({ model, temperature: 0, maxOutputTokens: 16, prompt: "Name three colours." });
let text = "";
let parts = 0;
for await (const piece of stream.textStream) { text += piece; parts += 1; }
console.log(JSON.stringify({ check: "streamText", text, parts }));

const called = await generateText({
  model, temperature: 0, maxOutputTokens: 80, toolChoice: "required",
  tools: { get_weather: tool({ description: "The weather in a city", inputSchema: z.object({ city: z.string().max(20) }) }) },
  prompt: "What is the weather in Paris?",
});
console.log(JSON.stringify({ check: "toolCall", calls: called.toolCalls.map((c) => ({ name: c.toolName, input: c.input })) }));
