// The Vercel AI SDK's own client code against a running chatfleet gateway: what a `useChat` app
// does, without rendering. Run by chatfleet/tests/ai_sdk.rs, which starts the fleet (a mock
// model streaming slowly enough to join a reply mid-way) and passes its address in
// CHATFLEET_BASE_URL.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Chat } from '@ai-sdk/react';
import { DefaultChatTransport, readUIMessageStream } from 'ai';

const base = process.env.CHATFLEET_BASE_URL;
assert.ok(base, 'CHATFLEET_BASE_URL names the gateway under test');

async function createSession() {
  const response = await fetch(`${base}/v1/sessions`, { method: 'POST' });
  assert.equal(response.status, 201);
  const { session_id: id, token } = await response.json();
  return { id, token };
}

function transportFor(session) {
  return new DefaultChatTransport({
    api: `${base}/v1/ai-sdk/chat`,
    headers: { Authorization: `Bearer ${session.token}` },
  });
}

function textOf(message) {
  return message.parts.filter((part) => part.type === 'text').map((part) => part.text).join('');
}

async function storedReply(session) {
  const response = await fetch(`${base}/v1/sessions/${session.id}/messages`, {
    headers: { Authorization: `Bearer ${session.token}` },
  });
  const { messages } = await response.json();
  return messages.filter((m) => m.role === 'assistant').at(-1)?.text;
}

async function until(condition, what, ms = 20000) {
  const deadline = Date.now() + ms;
  while (!condition()) {
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

test('DefaultChatTransport and readUIMessageStream receive the whole reply', async () => {
  const session = await createSession();
  const stream = await transportFor(session).sendMessages({
    chatId: session.id,
    messages: [{ id: 'u1', role: 'user', parts: [{ type: 'text', text: 'hello from the AI SDK' }] }],
    trigger: 'submit-message',
    messageId: undefined,
    abortSignal: undefined,
  });

  let last;
  for await (const message of readUIMessageStream({ stream })) last = message;

  assert.equal(last.role, 'assistant');
  assert.ok(textOf(last).startsWith('You said: "hello from the AI SDK".'), textOf(last));
  assert.equal(textOf(last), await storedReply(session), 'the reply as the history keeps it');
});

test('a second Chat resumes the reply in progress through resumeStream()', async () => {
  const session = await createSession();
  const first = new Chat({ id: session.id, transport: transportFor(session) });
  const sending = first.sendMessage({ text: 'a reply to join half-way' });
  await until(() => first.status === 'streaming' && textOf(first.messages.at(-1)).length > 0, 'the first chat streaming');

  const second = new Chat({ id: session.id, transport: transportFor(session) });
  await second.resumeStream();
  await sending;

  assert.equal(first.status, 'ready', String(first.error));
  assert.equal(second.status, 'ready', String(second.error));
  const reply = textOf(first.messages.at(-1));
  assert.ok(reply.startsWith('You said: "a reply to join half-way".'), reply);
  assert.equal(textOf(second.messages.at(-1)), reply, 'the resumed chat has the whole reply, once');
  assert.equal(reply, await storedReply(session));
});

test('resuming when no reply is in progress is 204 and leaves the chat ready', async () => {
  const session = await createSession();
  const response = await fetch(`${base}/v1/ai-sdk/chat/${session.id}/stream`, {
    headers: { Authorization: `Bearer ${session.token}` },
  });
  assert.equal(response.status, 204);

  const chat = new Chat({ id: session.id, transport: transportFor(session) });
  await chat.resumeStream();

  assert.equal(chat.status, 'ready');
  assert.deepEqual(chat.messages, []);
});

test('a Chat sends a second message with the history held by the server', async () => {
  const session = await createSession();
  const chat = new Chat({ id: session.id, transport: transportFor(session) });

  await chat.sendMessage({ text: 'first' });
  await chat.sendMessage({ text: 'second' });

  assert.equal(chat.status, 'ready', String(chat.error));
  assert.deepEqual(chat.messages.map((m) => m.role), ['user', 'assistant', 'user', 'assistant']);
  assert.ok(textOf(chat.messages[3]).startsWith('You said: "second".'), textOf(chat.messages[3]));
});
