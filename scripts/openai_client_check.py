#!/usr/bin/env python3
"""Talks to a running omnistage server with the official `openai` package, unchanged.

Checks chat completions (plain and streamed, with usage), text completions, the model list,
errors in OpenAI's shape, image generation, image and audio content parts, and speech (chat with
audio, whole and streamed, and the speech endpoint). Exits non-zero on the first mismatch.

Usage: python3 scripts/openai_client_check.py [--base-url http://127.0.0.1:8000/v1]
"""
import argparse
import base64
import struct
import sys

import openai


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")

    models = client.models.list()
    model = models.data[0].id
    print(f"models: {[m.id for m in models.data]}")

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = chat.choices[0].message.content
    assert chat.object == "chat.completion", chat.object
    assert chat.choices[0].finish_reason == "length", chat.choices[0].finish_reason
    assert chat.usage.completion_tokens == 12, chat.usage
    assert chat.usage.prompt_tokens > 0, chat.usage
    print(f"chat: {text!r} usage={chat.usage}")

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    streamed = "".join(pieces)
    assert finish == "length", finish
    assert usage is not None and usage.completion_tokens == 12, usage
    # Greedy decoding: the streamed text equals the non-streamed one for the same conversation
    # only when the prompt is the same, so compare against a fresh non-streamed call.
    again = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert again.choices[0].message.content == streamed, (again.choices[0].message.content, streamed)
    print(f"stream: {streamed!r} finish={finish} usage={usage}")

    completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert completion.object == "text_completion", completion.object
    assert completion.usage.completion_tokens <= 8, completion.usage
    print(f"completion: {completion.choices[0].text!r}")

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as e:
        print(f"unknown model -> {e.status_code}: {e.message}")
    else:
        raise AssertionError("an unknown model must be a 404")

    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=5)
    except openai.BadRequestError as e:
        print(f"bad temperature -> {e.status_code}: {e.message}")
    else:
        raise AssertionError("temperature 5 must be a 400")

    images = client.images.generate(
        model=model,
        prompt="a red fox in the snow",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 7, "steps": 4},
    )
    assert len(images.data) == 2, images
    png = base64.b64decode(images.data[0].b64_json)
    assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:8]
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (64, 64), (width, height)
    print(f"images: {len(images.data)} PNGs of {width}x{height}")

    try:
        client.images.generate(model=model, prompt="x", size="4096x4096")
    except openai.BadRequestError as e:
        print(f"bad image size -> {e.status_code}: {e.message}")
    else:
        raise AssertionError("an oversized image must be a 400")

    voice_chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        modalities=["text", "audio"],
        audio={"voice": "default", "format": "wav"},
        max_tokens=8,
        seed=11,
    )
    audio = voice_chat.choices[0].message.audio
    wav = base64.b64decode(audio.data)
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE", wav[:12]
    assert audio.transcript, audio
    print(f"chat audio: {len(wav)} WAV bytes, transcript {audio.transcript!r}")

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        modalities=["text", "audio"],
        audio={"voice": "default", "format": "pcm16"},
        max_tokens=8,
        seed=11,
        stream=True,
    )
    pcm, transcript = b"", ""
    for chunk in stream:
        for choice in chunk.choices:
            delta_audio = getattr(choice.delta, "audio", None) or {}
            if delta_audio.get("data"):
                pcm += base64.b64decode(delta_audio["data"])
            transcript += delta_audio.get("transcript", "")
    assert transcript == audio.transcript, (transcript, audio.transcript)
    assert len(pcm) == len(wav) - 44, (len(pcm), len(wav))
    print(f"streamed chat audio: {len(pcm)} PCM bytes")

    speech = client.audio.speech.create(model=model, voice="default", input="Hello there.", response_format="wav")
    spoken = speech.read()
    assert spoken[:4] == b"RIFF", spoken[:12]
    print(f"speech: {len(spoken)} WAV bytes")

    try:
        client.audio.speech.create(model=model, voice="nobody", input="x")
    except openai.BadRequestError as e:
        print(f"unknown voice -> {e.status_code}: {e.message}")
    else:
        raise AssertionError("an unknown voice must be a 400")

    # The generated picture and speech go back in as content parts: the thinker sees and hears.
    question = [{"type": "text", "text": "What is in these?"}]
    plain = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=4, temperature=0
    )
    seen = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": question
                + [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
                    {"type": "input_audio", "input_audio": {"data": base64.b64encode(spoken).decode(), "format": "wav"}},
                ],
            }
        ],
        max_tokens=4,
        temperature=0,
    )
    assert seen.usage.prompt_tokens > plain.usage.prompt_tokens, (seen.usage, plain.usage)
    print(f"image + audio in: {seen.usage.prompt_tokens} prompt tokens (text alone {plain.usage.prompt_tokens})")

    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        )
    except openai.BadRequestError as e:
        assert "image_url" in (e.param or ""), e.param
        print(f"corrupt image -> {e.status_code}: {e.message} (param {e.param})")
    else:
        raise AssertionError("a corrupt image must be a 400")

    print("openai client check: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
