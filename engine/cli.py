"""`llamba` command line: thin — parses flags, calls the library, prints.

    llamba run [-m MODEL] -p PROMPT [-n N] [-t THREADS] [-c CTX] [--temp T] [--top-k K] [--top-p P] [--min-p P]
               [--repeat-penalty R] [--seed S]
    llamba info MODEL
    llamba warmup [-m MODEL]   (compile the kernels a model needs ahead of its first run)
    llamba chat [-m MODEL] [--system TEXT] [--chat-template NAME|FILE] [sampling flags]   (interactive REPL)
    llamba serve [-m MODEL] [--host 127.0.0.1] [--port 8080] [-np N] [--api-key KEY]   (OpenAI-compatible HTTP server)
    llamba cluster serve -m MODEL --replicas N [--threads-per-replica T] [--port 8000] [--address ADDR]
               [--min-replicas A --max-replicas B]   (replicas behind Ray Serve; needs llamba[cluster])

Errors print one line to stderr and exit with status 1 (no traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from llamba.errors import LlambaError


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("-m", "--model", help="GGUF model file (default: the embedded Gemma 3 270M from llamba[demo])")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens (0 = the model's)")
    p.add_argument("-b", "--batch-size", type=int, default=512,
                   help="most prompt tokens processed in one step (default 512; bounds activation memory)")
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", default="0",
                   help="layers to offload to the GPU (N, -1 or 'all')")
    p.add_argument("--tensor-split", default=None, help="GPU split proportions, e.g. 3,1")
    p.add_argument("--split-mode", "-sm", default="layer", choices=["none", "layer", "row"],
                   help="how to use several GPUs: layer (contiguous layer ranges, default) or none (--main-gpu)")
    p.add_argument("--main-gpu", "-mg", type=int, default=0, help="the GPU used with --split-mode none")
    from llamba.options import add_cli_args
    add_cli_args(p)  # engine options: --kv-type, --no-repack, --gemm-min-batch (llamba.options)
    p.add_argument("--verbose", action="store_true", help="print load details")


def _add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--temp", type=float, default=0.8, help="temperature (<= 0: greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=-1, help="RNG seed (-1: random)")


def _add_spec_args(p: argparse.ArgumentParser):
    p.add_argument("--spec", choices=["auto", "mtp", "draft", "ngram", "none"], default="auto",
                   help="speculative decoding: auto = the model's MTP head when it has one")
    p.add_argument("--draft-max", type=int, default=3, help="tokens drafted per step (default 3)")
    p.add_argument("--draft-p-min", type=float, default=0.0, help="stop drafting below this probability")
    p.add_argument("--draft-model", default=None, help="a smaller GGUF with the same vocabulary (--spec draft)")
    p.add_argument("--mtp-head", default=None, metavar="HEAD.gguf",
                   help="a sidecar MTP head trained for this model (llamba mtp-train); --spec auto drafts with it")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llamba", description="Local LLM inference on GGUF models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="generate a continuation of a prompt, streamed to stdout")
    _add_model_args(run)
    run.add_argument("-p", "--prompt", required=True, help="prompt text, or - to read it from stdin")
    run.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1: until end/context)")
    run.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    run.add_argument("--special", action="store_true", help="parse special tokens in the prompt")
    run.add_argument("-j", "--json-schema", default=None, metavar="FILE|JSON",
                     help="constrain the output to JSON valid against this schema (a file, or inline JSON as "
                          "llama.cpp's -j)")
    run.add_argument("--grammar-file", default=None, metavar="FILE",
                     help="constrain the output with a llama.cpp GBNF grammar read from FILE")
    run.add_argument("--grammar", default=None, metavar="GBNF", help="constrain the output with this GBNF grammar")
    _add_sampling_args(run)
    _add_spec_args(run)
    chat = sub.add_parser("chat", help="interactive chat in the terminal (multi-turn, reuses the KV cache)",
                          description="Chat with a model through its chat template. Commands: /reset clears the "
                                      "conversation, /exit (or Ctrl-D) quits; Ctrl-C stops an answer and keeps it.")
    _add_model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                      help="chat template to use instead of the model's: a built-in name (chatml, gemma, llama3, "
                           "llama2, zephyr, phi3) or a Jinja file")
    chat.add_argument("-n", "--n-predict", type=int, default=-1, help="max tokens per answer (-1: until end/context)")
    chat.add_argument("--ignore-eos", action="store_true", help="never stop at end-of-generation tokens (testing)")
    _add_sampling_args(chat)
    _add_spec_args(chat)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)",
                           description="OpenAI-compatible HTTP server (FastAPI on uvicorn): completions, chat, "
                                       "embeddings, /tokenize, /detokenize, /tokenizer_info, /metrics, /health. "
                                       "With the batching engine up to -np requests decode at once; otherwise they "
                                       "are served one at a time in arrival order and the others wait in a queue.")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8080, help="port (0: pick a free one; it is printed)")
    serve.add_argument("-np", "--parallel", "--n-parallel", dest="n_parallel", type=int, default=4,
                       help="requests decoded at once (slots) when the model runs on the batching engine "
                            "(default 4); without it, one at a time")
    serve.add_argument("--max-queue", type=int, default=64, help="requests that may wait before 503 (default 64)")
    serve.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    serve.add_argument("--timeout", type=float, default=600.0,
                       help="seconds a streaming client may go without reading before it is dropped (default 600)")
    serve.add_argument("--read-timeout", type=float, default=30.0,
                       help="seconds to receive a request's headers and body (default 30)")
    serve.add_argument("--keep-alive", type=float, default=5.0, help="idle keep-alive seconds (default 5)")
    serve.add_argument("--max-connections", type=int, default=512,
                       help="open connections before new requests get 503 (default 512)")
    serve.add_argument("--stream-buffer", type=int, default=1 << 20,
                       help="bytes of events held for a streaming client that is not reading (default 1 MiB)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browser requests from ORIGIN (repeatable; '*' for any)")
    serve.add_argument("--alias", default=None, help="model name reported by the API (default: the file name)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    serve.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                       help="chat template instead of the model's (built-in name or Jinja file)")
    serve.add_argument("--seed", type=int, default=-1, help="RNG seed for requests without one (-1: random)")
    serve.add_argument("--pooling", choices=["none", "mean", "cls", "last"], default=None,
                       help="pooling of /v1/embeddings (default: the model's pooling_type)")
    _add_spec_args(serve)
    from llamba.perplexity import add_parser as _perplexity_parser
    _perplexity_parser(sub, _add_model_args)
    from llamba.train.cli import add_parser as _mtp_train_parser
    _mtp_train_parser(sub, _add_model_args)
    _add_cluster_parser(sub)
    wu = sub.add_parser("warmup", help="compile the kernels a model needs now (first run; cached afterwards)",
                        description="Compile ahead of time what a model's first run would compile (Numba kernels, "
                                    "kept in Numba's disk cache), with progress on stderr: with no -m, the default "
                                    "model. Later runs of any model with the same tensor types start at once.")
    _add_model_args(wu)
    info = sub.add_parser("info", help="describe a GGUF model")
    info.add_argument("model", nargs="?", help="GGUF model file")
    info.add_argument("--devices", action="store_true", help="list GPU devices")
    return ap


def _add_cluster_parser(sub):
    cl = sub.add_parser("cluster", help="llamba replicas behind Ray Serve (needs llamba[cluster])")
    csub = cl.add_subparsers(dest="cluster_cmd", required=True)
    cs = csub.add_parser("serve", help="one OpenAI-compatible endpoint in front of N llamba engine replicas",
                         description="Starts (or joins, --address) a Ray cluster and deploys N llamba replicas, each "
                                     "its own batching engine, behind one OpenAI-compatible HTTP ingress (Ray "
                                     "Serve). Requests of one conversation go to the replica that holds its prefix, "
                                     "others to the least-loaded one. The model file must be readable at the same "
                                     "path on every node.")
    cs.add_argument("-m", "--model", required=True, help="GGUF model file (same path on every node)")
    cs.add_argument("--replicas", type=int, default=2, help="engine replicas (default 2; with autoscaling the "
                                                            "initial number)")
    cs.add_argument("--threads-per-replica", type=int, default=1,
                    help="CPU threads per engine, also the CPUs Ray reserves for it (default 1)")
    cs.add_argument("-np", "--parallel", "--n-parallel", dest="n_parallel", type=int, default=4,
                    help="requests each engine decodes at once (default 4)")
    cs.add_argument("--min-replicas", type=int, default=None, help="autoscale down to this many replicas")
    cs.add_argument("--max-replicas", type=int, default=None,
                    help="autoscale up to this many replicas (by requests in flight and queued per replica)")
    cs.add_argument("--host", default="127.0.0.1", help="address of the HTTP ingress (default: loopback only)")
    cs.add_argument("--port", type=int, default=8000, help="port of the HTTP ingress (default 8000)")
    cs.add_argument("--address", default=None,
                    help="join this Ray cluster (e.g. auto, or HEAD_IP:6379 after `ray start --head`); "
                         "default: start a local one")
    cs.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster (default: all)")
    cs.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens per replica")
    cs.add_argument("-b", "--batch-size", type=int, default=512, help="most prompt tokens processed in one step")
    cs.add_argument("--max-queue", type=int, default=64, help="requests that may wait in a replica before 503")
    cs.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    cs.add_argument("--alias", default=None, help="model name reported by the API (default: the file name)")
    cs.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    cs.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                    help="chat template instead of the model's (built-in name or Jinja file)")
    cs.add_argument("--seed", type=int, default=-1, help="RNG seed for requests without one (-1: random)")
    cs.add_argument("--spec", choices=["auto", "mtp", "draft", "ngram", "none"], default="auto",
                    help="speculative decoding in each replica (auto = the model's MTP head when it has one)")
    cs.add_argument("--stream-interval", type=float, default=0.05,
                    help="seconds a replica gathers a stream's events into one message to the ingress (default "
                         "0.05: less CPU per token; 0: each event at once)")


def _model_path(arg: str | None) -> str:
    if arg:
        return arg
    from llamba.demo import default_model_path
    return default_model_path()


def _gpu_kwargs(a) -> dict:
    """The offload and engine options of `_add_model_args` as Llama keyword arguments."""
    from llamba.backend import parse_ngl
    from llamba.options import cli_kwargs
    return dict(n_gpu_layers=parse_ngl(a.n_gpu_layers), tensor_split=a.tensor_split, split_mode=a.split_mode,
                main_gpu=a.main_gpu, **cli_kwargs(a))


def _compile_progress():
    """Names each kernel Numba compiles (first run: not in its disk cache yet) on stderr; silent when all load."""
    from llamba.warmup import FIRST_RUN_HEADER, CompileProgress
    return CompileProgress(header=FIRST_RUN_HEADER)


def cmd_warmup(a) -> int:
    from llamba.llama import Llama
    from llamba.warmup import CompileProgress, fused_index_exists, prepare_first_run, start_fused_worker, warmup
    from llamba.options import cli_kwargs
    path = _model_path(a.model)
    t0 = time.perf_counter()
    with CompileProgress(header=f"llamba: compiling the kernels for {os.path.basename(path)}") as prog:
        prog.stage(1, 5, "load")
        worker = None if fused_index_exists() else start_fused_worker(path)
        llm = Llama(path, n_ctx=a.ctx_size, n_threads=a.threads, n_batch=a.batch_size, verbose=a.verbose,
                    **cli_kwargs(a))
        worker = prepare_first_run(llm, prog, worker, stage=2, n_stages=5)
        warmup(llm, prog, stages_before=2)
    dt = time.perf_counter() - t0
    print(f"llamba: warmup done in {dt:.1f} s: {prog.compiled} kernel{'s' if prog.compiled != 1 else ''} compiled "
          f"in this process" + (" and the matmul kernels in a second one" if worker is not None else "")
          + ("" if prog.compiled or worker is not None else " (all were in the cache)"), file=sys.stderr)
    return 0


def cmd_run(a) -> int:
    from llamba.llama import Llama
    from llamba.sampling import RANDOM_SEED
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    path = _model_path(a.model)
    prog = _compile_progress().__enter__()  # until the first token
    prog.stage(1, 3, "load")
    from llamba.warmup import fused_index_exists, prepare_first_run, start_fused_worker
    # a fresh install: the matmul kernels compile in a second process from now on (see llamba.warmup)
    worker = None if fused_index_exists() else start_fused_worker(path)
    t0 = time.perf_counter()
    llm = Llama(path, n_ctx=a.ctx_size, n_threads=a.threads, seed=RANDOM_SEED if a.seed < 0 else a.seed,
                n_batch=a.batch_size, verbose=a.verbose, spec=a.spec, draft_max=a.draft_max, draft_p_min=a.draft_p_min,
                draft_model=a.draft_model, mtp_head=a.mtp_head, **_gpu_kwargs(a))
    llm.speculative_proposer()  # a bad --spec choice fails here, before any output
    prepare_first_run(llm, prog, worker)
    t_load = time.perf_counter() - t0
    toks = llm.tokenize(prompt.encode("utf-8"), add_bos=not a.no_bos, special=a.special)
    if not toks:
        raise LlambaError("the prompt is empty after tokenization; give some text with -p")
    n_predict = a.n_predict if a.n_predict and a.n_predict > 0 else None
    cons = _constraint_args(a)
    if cons:
        llm.compile_constraint(**cons)  # a bad schema or grammar fails here, before any output (one line)
    if len(toks) >= llm.n_ctx():
        from llamba.errors import ContextOverflowError
        raise ContextOverflowError(f"the prompt has {len(toks)} tokens but the context holds {llm.n_ctx()}; "
                                   f"raise -c or shorten the prompt")
    out = sys.stdout
    prog.stage(3, 3, "first token")
    for chunk in llm.create_completion(toks, max_tokens=n_predict or -1, temperature=a.temp, top_k=a.top_k,
                                       top_p=a.top_p, min_p=a.min_p, repeat_penalty=a.repeat_penalty,
                                       stream=True, **cons):
        if prog is not None:
            prog.__exit__(None, None, None)
            if prog.compiled:
                print(f"llamba: compiled {prog.compiled} kernels in {prog.elapsed():.0f} s (cached for later runs)",
                      file=sys.stderr, flush=True)
            prog = None
        out.write(chunk["choices"][0]["text"])
        out.flush()
    out.write("\n")
    out.flush()
    st = llm.last_stats
    print(f"llamba: load {t_load:.2f} s | prompt {st.n_prompt} tokens, {st.prompt_tps:.1f} tokens/s | "
          f"generated {st.n_gen} tokens, {st.gen_tps:.1f} tokens/s", file=sys.stderr)
    if st.spec:
        print(f"llamba: {st.spec.summary()}", file=sys.stderr)
    return 0


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise LlambaError(f"cannot read the {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def _constraint_args(a) -> dict:
    """create_completion keywords for --json-schema / --grammar-file / --grammar (checked: one at most)."""
    import json
    given = [x for x in (a.json_schema, a.grammar_file, a.grammar) if x is not None]
    if len(given) > 1:
        raise LlambaError("give one of --json-schema, --grammar-file and --grammar")
    if a.json_schema is not None:
        js = a.json_schema
        text = js if js.lstrip().startswith("{") else _read_text(js, "JSON schema")
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise LlambaError(f"the JSON schema is not valid JSON: {e}") from None
        return {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
    if a.grammar_file is not None:
        return {"grammar": _read_text(a.grammar_file, "grammar file")}
    if a.grammar is not None:
        return {"grammar": a.grammar}
    return {}


def _load_for_chat(a):
    """A Llama for `chat` / `serve`, with a chat template (the built-in gemma one for template-less Gemma)."""
    from llamba.chat import ChatTemplate
    from llamba.llama import Llama
    from llamba.sampling import RANDOM_SEED
    from llamba.llama import POOLING_NAMES, POOLING_UNSPECIFIED
    path = _model_path(a.model)
    pooling = getattr(a, "pooling", None)
    pt = {v: k for k, v in POOLING_NAMES.items()}[pooling] if pooling else POOLING_UNSPECIFIED
    llm = Llama(path, n_ctx=a.ctx_size, n_threads=a.threads, seed=RANDOM_SEED if a.seed < 0 else a.seed,
                n_batch=a.batch_size, verbose=a.verbose, spec=a.spec, draft_max=a.draft_max, draft_p_min=a.draft_p_min,
                draft_model=a.draft_model, mtp_head=a.mtp_head, chat_template=a.chat_template, embedding=True, pooling_type=pt,
                **_gpu_kwargs(a))
    llm.speculative_proposer()  # a bad --spec choice fails here
    if not a.chat_template and not llm.metadata.get("tokenizer.chat_template"):
        arch = str(llm.metadata.get("general.architecture", ""))
        if arch.startswith("gemma"):
            print(f"llamba: {os.path.basename(path)} has no chat template (a base model?); using the built-in "
                  f"'gemma' template", file=sys.stderr)
            llm.set_chat_template(ChatTemplate.load("gemma", metadata=llm.metadata, tokenizer=llm.tokenizer))
    return llm


def _read_line(prompt: str, use_readline: bool):
    """One line from stdin without its newline, or None at end of input."""
    if use_readline:
        try:
            return input(prompt)
        except EOFError:
            return None
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\n")


def cmd_chat(a) -> int:
    import signal
    from llamba.chat import ChatSession
    llm = _load_for_chat(a)
    tmpl = llm.get_chat_template()  # no template at all: a clear error before the prompt
    bias = {int(t): float("-inf") for t in llm.tokenizer.eog_ids} if a.ignore_eos else None
    sess = ChatSession(llm, system=a.system, temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                       repeat_penalty=a.repeat_penalty, max_tokens=a.n_predict if a.n_predict > 0 else None,
                       logit_bias=bias)
    use_readline = False
    from llamba.options import env
    if sys.stdin.isatty() and env("TERM", "dumb") != "dumb":
        try:
            import readline  # noqa: F401 - line editing and history for input()
            use_readline = True
        except ImportError:
            pass
    out = sys.stdout
    print(f"llamba: chatting with {os.path.basename(llm.model_path)} (template: {tmpl.name}). /reset clears the "
          f"conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer.", file=sys.stderr, flush=True)
    turn = 0
    while True:
        try:
            line = _read_line("> ", use_readline)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line
            out.write("\n")
            continue
        if line is None:
            out.write("\n")
            out.flush()
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return 0
        if cmd == "/reset":
            sess.reset()
            turn = 0
            print("llamba: conversation cleared", file=sys.stderr, flush=True)
            continue
        if cmd in ("/help", "/?"):
            print("commands: /reset (clear the conversation), /exit (quit); Ctrl-C stops an answer", file=sys.stderr)
            continue
        stop = {"requested": False}

        def on_sigint(signum, frame):
            if stop["requested"]:  # a second Ctrl-C: stop even where no text comes out
                raise KeyboardInterrupt
            stop["requested"] = True

        old = signal.signal(signal.SIGINT, on_sigint)
        gen = sess.send(line)
        forced = False
        try:
            for piece in gen:
                out.write(piece)
                out.flush()
                if stop["requested"]:
                    break
        except KeyboardInterrupt:
            forced = True
        except LlambaError as e:
            from llamba.errors import ContextOverflowError
            hint = " (/reset starts a new conversation)" if isinstance(e, ContextOverflowError) else ""
            print(f"llamba: error: {e}{hint}", file=sys.stderr, flush=True)
            continue
        finally:
            gen.close()
            signal.signal(signal.SIGINT, old)
        out.write("\n")
        out.flush()
        m = llm.model
        if forced or (m is not None and getattr(m, "n_past", len(llm.session.tokens)) != len(llm.session.tokens)):
            llm.reset()  # interrupted inside the model: start the cache over (the history is kept)
        turn += 1
        if stop["requested"]:
            print("llamba: answer interrupted (kept in the conversation)", file=sys.stderr, flush=True)
        if a.verbose and sess.last:
            x = sess.last
            st = x["stats"]
            note = ""
            if turn > 1 and not x["extends"]:
                note = " (the template re-rendered the history: reuse stops where it differs)"
            print(f"llamba: turn {turn}: prompt {x['n_prompt_tokens']} tokens = {x['n_reused']} reused + "
                  f"{x['n_new']} new ({st.prompt_tps if st else 0:.1f} tokens/s) | generated {x['n_gen']} "
                  f"tokens ({st.gen_tps if st else 0:.1f} tokens/s){note}", file=sys.stderr, flush=True)


def cmd_serve(a) -> int:
    from llamba.server import make_server
    llm = _load_for_chat(a)
    try:
        llm.get_chat_template()
    except LlambaError as e:
        print(f"llamba: warning: /v1/chat/completions is unavailable: {e}", file=sys.stderr)
    if a.n_parallel < 1:
        raise LlambaError(f"-np/--parallel must be at least 1, got {a.n_parallel}")
    # every request goes through the continuous-batching scheduler (llamba.scheduler): up to n_parallel
    # sequences decode together, one loop for plain and speculative decoding
    llm.start_engine(a.n_parallel)
    srv = make_server(llm, a.host, a.port, alias=a.alias, max_body=a.max_body, max_queue=a.max_queue,
                      timeout=a.timeout if a.timeout > 0 else None, verbose=a.verbose, api_key=a.api_key,
                      n_parallel=a.n_parallel, cors_origins=a.cors_origin, max_connections=a.max_connections,
                      keep_alive=a.keep_alive, read_timeout=a.read_timeout, stream_buffer=a.stream_buffer)
    host, port = srv.server_address[:2]
    if host not in ("127.0.0.1", "::1", "localhost") and not a.api_key:
        print(f"llamba: warning: listening on {host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    svc = srv.service
    if svc.concurrent:
        mode = f"{svc.slots} request{'s' if svc.slots != 1 else ''} decoded at once (-np {a.n_parallel})"
    else:
        mode = "one request at a time: the others wait in a queue"
        if a.n_parallel != 1:
            mode += f"; -np {a.n_parallel} needs the batching engine"
    url_host = f"[{host}]" if ":" in host else host
    print(f"llamba: serving {svc.alias} on http://{url_host}:{port} ({mode}; Ctrl-C stops)", file=sys.stderr,
          flush=True)
    # HTTP and the engine share this (the main) thread, where the model was loaded: the engine steps as a task
    # of the server's event loop (Engine.run_async), so per token no other thread of the server wakes up (kernels
    # should also start from one thread: with GNU OpenMP a second kernel-launching thread ran 2x slower, see
    # Engine.run_forever); Ctrl-C or SIGTERM stop both
    import signal

    def _term(signum, frame):
        raise KeyboardInterrupt

    try:
        old_term = signal.signal(signal.SIGTERM, _term)
    except ValueError:  # not the main thread (cmd_serve called from elsewhere): the default handling
        old_term = None
    try:
        srv.serve_forever(engine=llm.engine)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        srv.server_close()
    return 0


def cmd_cluster(a) -> int:
    try:
        import ray
        from llamba import cluster
        if not cluster.HAVE_RAY:
            raise ImportError
    except ImportError:
        raise LlambaError('llamba cluster needs Ray Serve: pip install "llamba[cluster]"') from None
    from ray import serve
    from llamba.sampling import RANDOM_SEED
    path = os.path.abspath(a.model)
    if not os.path.isfile(path):
        raise LlambaError(f"no model file {path}")
    if a.replicas < 1 or a.threads_per_replica < 1 or a.n_parallel < 1:
        raise LlambaError("--replicas, --threads-per-replica and -np must be at least 1")
    autoscaling = None
    if a.min_replicas is not None or a.max_replicas is not None:
        lo = a.min_replicas if a.min_replicas is not None else 1
        hi = a.max_replicas if a.max_replicas is not None else max(lo, a.replicas)
        if not 0 <= lo <= hi or hi < 1:
            raise LlambaError(f"need 0 <= --min-replicas <= --max-replicas, >= 1 (got {lo}, {hi})")
        autoscaling = {"min_replicas": lo, "max_replicas": hi,
                       "initial_replicas": min(max(a.replicas, lo), hi)}
    llama_kw = dict(n_ctx=a.ctx_size, n_batch=a.batch_size, seed=RANDOM_SEED if a.seed < 0 else a.seed,
                    spec=a.spec, chat_template=a.chat_template)
    server_kw = {"api_key": a.api_key} if a.api_key else {}
    app = cluster.deployment(path, replicas=a.replicas, threads_per_replica=a.threads_per_replica,
                             n_parallel=a.n_parallel, autoscaling=autoscaling, max_queue=a.max_queue,
                             llama_kwargs=llama_kw, server_kwargs=server_kw, alias=a.alias, max_body=a.max_body,
                             stream_interval=a.stream_interval)
    from llamba.options import env
    started = not (a.address or env("RAY_ADDRESS"))
    cpus = a.num_cpus or os.cpu_count() or 1
    if started and a.replicas * a.threads_per_replica > cpus:
        print(f"llamba: warning: {a.replicas} replicas x {a.threads_per_replica} threads need more than the "
              f"{cpus} CPUs of this machine: Ray starts only the replicas that fit", file=sys.stderr)
    try:
        ray.init(address=a.address, num_cpus=a.num_cpus if started else None, include_dashboard=False,
                 log_to_driver=True)
    except Exception as e:  # noqa: BLE001 - Ray's errors: one line
        lines = [x for x in str(e).splitlines() if x.strip()]
        hint = ""
        if "auth" in str(e).lower():
            hint = (" (the cluster uses Ray's token authentication: run with RAY_AUTH_MODE=token and its token in "
                    "~/.ray/auth_token or RAY_AUTH_TOKEN)")
        where = "join the Ray cluster at " + str(a.address or env("RAY_ADDRESS")) if not started \
            else "start a local Ray cluster"
        raise LlambaError(f"cannot {where}: {type(e).__name__}: {lines[-1][:300] if lines else ''}{hint}") from None
    if a.host not in ("127.0.0.1", "::1", "localhost") and not a.api_key:
        print(f"llamba: warning: listening on {a.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)
    import signal

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # a service manager's stop: the same clean shutdown as Ctrl-C
    try:
        cluster.run(app, host=a.host, port=a.port)
        scale = (f"autoscaling {autoscaling['min_replicas']}-{autoscaling['max_replicas']} replicas"
                 if autoscaling else f"{a.replicas} replica{'s' if a.replicas != 1 else ''}")
        url_host = f"[{a.host}]" if ":" in a.host else a.host
        print(f"llamba: serving {a.alias or os.path.basename(path)} on http://{url_host}:{a.port} ({scale} x "
              f"{a.threads_per_replica} thread{'s' if a.threads_per_replica != 1 else ''}, -np {a.n_parallel} "
              f"each; Ray cluster {'started here' if started else 'at ' + str(a.address or 'RAY_ADDRESS')}; "
              f"Ctrl-C stops)", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
    finally:
        try:
            if started:
                serve.shutdown()
            else:
                serve.delete(cluster.APP_NAME)  # leave the shared cluster's other apps (and Serve) running
        finally:
            ray.shutdown()
    return 0


def cmd_info(a) -> int:
    if a.devices:
        from llamba.backend import describe_devices
        print("\n".join(describe_devices()))
        if not a.model:
            return 0
    from llamba.gguf import GGUFFile
    from llamba.layers import type_mix
    from llamba.models import build_config
    from llamba.tokenizer import Tokenizer
    path = _model_path(a.model)
    gf = GGUFFile(path)
    cfg = build_config(gf)
    n_params = sum(i.n_elements for i in gf.tensors.values())
    tok = Tokenizer.from_metadata(gf.metadata)
    name = gf.get("general.name", os.path.basename(path))
    print(f"model:          {name} ({path})")
    print(f"architecture:   {cfg.arch}")
    print(f"parameters:     {n_params / 1e6:.1f} M ({gf.file_size / 2**20:.1f} MiB on disk)")
    print(f"quant mix:      " + ", ".join(f"{k} x{v}" for k, v in type_mix(gf).items()))
    print(f"layers:         {cfg.n_layer} (+{cfg.n_nextn} MTP)" if cfg.n_nextn else f"layers:         {cfg.n_layer}")
    print(f"embedding:      {cfg.n_embd}, heads {cfg.n_head[0]} (kv {cfg.n_head_kv[0]}), head dim {cfg.head_dim}")
    if cfg.n_expert:
        shared = f", shared expert FFN {cfg.n_ff_shexp}" if cfg.n_ff_shexp else ", no shared expert"
        print(f"experts:        {cfg.n_expert} ({cfg.n_expert_used} used per token), expert FFN {cfg.n_ff_exp}{shared}")
    print(f"context length: {cfg.n_ctx_train}")
    print(f"tokenizer:      {gf.get('tokenizer.ggml.model')} (pre: {gf.get('tokenizer.ggml.pre', 'default')}), "
          f"{tok.n_vocab} tokens")
    sp = []
    for label, tid in (("bos", tok.bos_id), ("eos", tok.eos_id)):
        if tid is not None and tid >= 0:
            sp.append(f"{label}={tid} {tok.tokens[tid]!r}")
    sp.append("eog=" + ",".join(str(i) for i in sorted(tok.eog_ids)))
    print(f"special tokens: " + " ".join(sp) + f" (add_bos={tok.add_bos})")
    print(f"chat template:  {'yes' if gf.get('tokenizer.chat_template') else 'no'}")
    return 0


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        if a.cmd == "run":
            return cmd_run(a)
        if a.cmd == "info":
            return cmd_info(a)
        if a.cmd == "warmup":
            return cmd_warmup(a)
        if a.cmd == "chat":
            return cmd_chat(a)
        if a.cmd == "serve":
            return cmd_serve(a)
        if a.cmd == "cluster":
            return cmd_cluster(a)
        if a.cmd == "perplexity":
            from llamba.perplexity import main as perplexity_main
            a.model = _model_path(a.model)
            return perplexity_main(a)
        if a.cmd == "mtp-train":
            from llamba.train.cli import main as mtp_train_main
            a.model = _model_path(a.model)
            return mtp_train_main(a)
    except LlambaError as e:
        print(f"llamba: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
