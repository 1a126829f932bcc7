"""PyTorch side of `exitgraph bench --torch`.

Loads a Llama checkpoint with transformers' LlamaForCausalLM (eager PyTorch, SDPA attention)
and times the same work as the Rust side: one prefill call over the prompt (logits for the
last position only, `logits_to_keep=1`, as `generate` asks and as our prefill computes),
then greedy single-token decode steps with the KV cache, feeding back the argmax. The Rust side drives
it over stdin/stdout, one JSON object per line, so that repetitions of the three
implementations interleave in one run:

  -> {"cmd": "check"}                 <- {"logits": [...last position after prefill...]}
  -> {"cmd": "run"}                   <- {"prefill_ms": .., "decode_ms": .., "tokens": [...]}
  -> {"cmd": "quit"}

Arguments: MODEL_DIR PROMPT_LEN DECODE_TOKENS THREADS DTYPE (float32 or bfloat16) DEVICE
(cpu or cuda:N) BATCH (rows side by side, each its own prompt; tokens are reported row by
row per step). On a GPU every timed phase ends with reading the argmax on the host, which
waits for the GPU's queue, as the Rust side's does.
"""

import json
import sys
import time


def main():
    model_dir, prompt_len, decode, threads, dtype, device, batch = sys.argv[1:8]
    prompt_len, decode, threads, batch = int(prompt_len), int(decode), int(threads), int(batch)
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = LlamaForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype, attn_implementation="sdpa"
    )
    model.to(device)
    model.eval()
    vocab = model.config.vocab_size
    # The same prompt as the Rust side: token i is (i * 7919 + 13) mod vocab.
    # The same prompts as the Rust side: row r's token i is (i * 7919 + 13 + r * 104729) mod vocab.
    ids = torch.tensor(
        [[(i * 7919 + 13 + r * 104729) % vocab for i in range(prompt_len)] for r in range(batch)],
        device=device,
    )

    def run(steps):
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
            nxt = logits.argmax(-1).tolist()
            prefill = (time.perf_counter() - t0) * 1e3
            past = out.past_key_values
            tokens = list(nxt)
            t1 = time.perf_counter()
            for _ in range(steps):
                out = model(
                    input_ids=torch.tensor([[t] for t in nxt], device=device),
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1).tolist()
                tokens.extend(nxt)
            decode_ms = (time.perf_counter() - t1) * 1e3
        # The last row's logits, as the Rust side compares.
        return prefill, decode_ms, logits[-1], tokens

    print(json.dumps({"ready": True, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)["cmd"]
        if cmd == "check":
            _, _, logits, _ = run(1)
            reply = {"logits": logits.float().tolist()}
        elif cmd == "run":
            p, d, _, tokens = run(decode)
            reply = {"prefill_ms": p, "decode_ms": d, "tokens": tokens}
        else:
            break
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
