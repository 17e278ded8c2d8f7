// One tool-calling conversation through two real SDKs against mlxd; prints what each SDK reports.
//
// Usage: node sdk_check.mjs '{"baseURL", "model", "prompt", "tool": {"name", "description",
// "parameters"}, "toolResult"}'. The AI SDK (@ai-sdk/openai-compatible, what opencode uses)
// runs streamText with the tool for two steps: the call, then the answer to its result.
// openai-node sends the same two requests with chat.completions.create({stream: true}) and
// assembles them with the SDK's own ChatCompletionStream, which rejects malformed chunks.
// Any SDK error exits non-zero; tests/test_node_sdks.py checks the report against ground truth.

import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { jsonSchema, stepCountIs, streamText, tool } from "ai";
import OpenAI from "openai";
import { ChatCompletionStream } from "openai/lib/ChatCompletionStream";

const spec = JSON.parse(process.argv[2]);

async function aiSdk() {
  const mlxd = createOpenAICompatible({ name: "mlxd", baseURL: spec.baseURL, includeUsage: true });
  const result = streamText({
    model: mlxd.chatModel(spec.model),
    prompt: spec.prompt,
    tools: {
      [spec.tool.name]: tool({
        description: spec.tool.description,
        inputSchema: jsonSchema(spec.tool.parameters),
        execute: async () => spec.toolResult,
      }),
    },
    stopWhen: stepCountIs(2),
    maxRetries: 0,
  });
  for await (const part of result.fullStream) {
    if (part.type === "error") throw part.error;
  }
  return (await result.steps).map((step) => ({
    text: step.text,
    toolCalls: step.toolCalls.map((c) => ({ id: c.toolCallId, name: c.toolName, arguments: c.input })),
    finishReason: step.finishReason,
    usage: {
      inputTokens: step.usage.inputTokens,
      outputTokens: step.usage.outputTokens,
      totalTokens: step.usage.totalTokens,
      cacheReadTokens: step.usage.inputTokenDetails.cacheReadTokens,
      noCacheTokens: step.usage.inputTokenDetails.noCacheTokens,
    },
  }));
}

async function openaiNode() {
  const client = new OpenAI({ baseURL: spec.baseURL, apiKey: "mlxd", maxRetries: 0 });
  const tools = [{ type: "function", function: spec.tool }];
  const messages = [{ role: "user", content: spec.prompt }];
  const turns = [];
  for (let turn = 0; turn < 2; turn++) {
    const stream = await client.chat.completions.create({
      model: spec.model,
      messages,
      tools,
      stream: true,
      stream_options: { include_usage: true },
    });
    const assembled = ChatCompletionStream.fromReadableStream(stream.toReadableStream());
    const completion = await assembled.finalChatCompletion();
    const [choice] = completion.choices;
    const calls = choice.message.tool_calls ?? [];
    turns.push({
      text: choice.message.content ?? "",
      toolCalls: calls.map((c) => ({ id: c.id, name: c.function.name, arguments: JSON.parse(c.function.arguments) })),
      finishReason: choice.finish_reason,
      usage: completion.usage,
    });
    messages.push(choice.message);
    for (const call of calls) messages.push({ role: "tool", tool_call_id: call.id, content: spec.toolResult });
  }
  return turns;
}

const report = { aiSdk: await aiSdk(), openai: await openaiNode() };
process.stdout.write(JSON.stringify(report, null, 2) + "\n");
