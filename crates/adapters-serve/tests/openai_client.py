"""The official OpenAI Python client against `adapters serve` (argv[1]: base URL).

Prints one JSON object with what each endpoint returned; the Rust test checks it.
"""
import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
out = {}
out["models"] = [m.id for m in client.models.list().data]
done = client.completions.create(model="base", prompt="The capital of France is", max_tokens=6, temperature=0)
out["completion"] = done.choices[0].text
out["completion_usage"] = done.usage.completion_tokens
chat = client.chat.completions.create(
    model="smol-lora", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
)
out["chat"] = chat.choices[0].message.content
out["chat_model"] = chat.model
stream = client.chat.completions.create(
    model="smol-lora",
    messages=[{"role": "user", "content": "Say hello."}],
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
out["chat_streamed"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
# The last chunk carries the usage, and no choices.
out["chat_streamed_usage"] = [chunks[-1].usage.completion_tokens, len(chunks[-1].choices)]
emb = client.embeddings.create(model="base", input=["one text", "another text"])
out["embedding_dims"] = [len(e.embedding) for e in emb.data]
try:
    client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "x"}])
    out["unknown_model"] = "no error"
except Exception as e:  # the client raises NotFoundError for a 404
    out["unknown_model"] = type(e).__name__
print(json.dumps(out))
