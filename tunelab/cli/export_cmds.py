"""`tunelab convert pth_to_hf | to-hf | merge`: from a training checkpoint to HF files (XTuner's verb names)."""

from __future__ import annotations

import argparse

CONVERT_DESCRIPTION = """\
Turn a training checkpoint into files other tools read.

  pth_to_hf CFG CKPT OUT   checkpoint → HF adapter (LoRA / QLoRA) or HF model (full fine-tuning)
  to-hf CKPT OUT           the same, the config being optional (tunelab.json in the checkpoint says it all)
  merge BASE ADAPTER OUT   base + adapter → one HF model whose chat_template is the training template
  gguf MODEL OUT.gguf      HF model (or base + --adapter) → GGUF for llama.cpp, plus an Ollama Modelfile
  xtuner-config IN OUT     an XTuner (mmengine) config → an equivalent tunelab config

example:
  tunelab convert pth_to_hf my_config.py work_dirs/run1/iter_500 hf_adapter
  tunelab convert merge internlm/internlm2-chat-1_8b hf_adapter merged
  tunelab chat merged
"""

PTH_TO_HF_DESCRIPTION = """\
Convert a training checkpoint to a HF directory: a peft adapter (adapter_config.json + adapter_model.safetensors,
loadable with peft.PeftModel.from_pretrained) for LoRA / QLoRA, a full model for full fine-tuning.
CKPT is an iter_N directory, or a WORK_DIR (its newest checkpoint is used). tunelab.json and the tokenizer are copied
along. Weights are saved in bf16 unless --fp32.

example:
  tunelab convert pth_to_hf my_config.py work_dirs/run1/iter_500 hf_adapter
  tunelab convert pth_to_hf my_config.py work_dirs/run1 hf_adapter --fp32
  tunelab convert to-hf work_dirs/run1 hf_adapter
"""

MERGE_DESCRIPTION = """\
Merge a LoRA / QLoRA adapter into its base model and save one HF model with its tokenizer. The tokenizer's
chat_template is set to the prompt template used in training (from tunelab.json), so transformers, vLLM and LMDeploy
chat with the merged model the way it was trained. A QLoRA adapter is merged into the unquantised base.
ADAPTER is an adapter directory (from pth_to_hf), an iter_N checkpoint or a WORK_DIR. An adapter trained on a base of
another architecture is refused (--allow-other-base to merge anyway); OUT may not be an input, a checkpoint or a
work dir.

example:
  tunelab convert merge internlm/internlm2-chat-1_8b hf_adapter merged
  tunelab convert merge Qwen/Qwen2.5-0.5B-Instruct work_dirs/run1 merged --dtype bf16 --device cpu
  tunelab chat merged
"""

GGUF_DESCRIPTION = """\
Write a GGUF file for llama.cpp, Ollama and LM Studio, and an Ollama Modelfile beside it. MODEL is a merged HF model
directory (tunelab convert merge), a training WORK_DIR or iter_N checkpoint (a LoRA one merged into the base its
tunelab.json names), or a base model with --adapter (merged in memory). The GGUF file holds the weights
(--type f16, bf16, q8_0, f32, or q6_k, q5_k_m, q4_k_m, q4_0 by llama.cpp's quantiser), the tokenizer, and the chat
template the model was trained with (from tunelab.json, or --prompt-template); the Modelfile's TEMPLATE, stop words
and SYSTEM say the same in Ollama's terms.
Architectures: Llama (also Mistral and InternLM2), Qwen2, Qwen3, Phi-3, Gemma 2 and Gemma 3.

example:
  tunelab convert gguf merged merged.gguf --type q8_0
  tunelab convert gguf Qwen/Qwen2.5-0.5B-Instruct out/qwen-tuned.gguf --adapter work_dirs/run1
  tunelab convert gguf work_dirs/run1 out/qwen-tuned.gguf
  ollama create qwen-tuned -f out/Modelfile && ollama run qwen-tuned
  python -c "import llama_cpp; print(llama_cpp.Llama('merged.gguf').create_chat_completion([{'role': 'user', \\
    'content': 'Who are you?'}]))"
"""


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    convert = subparsers.add_parser("convert", help="checkpoint → HF adapter / model; merge an adapter into its base",
                                    description=CONVERT_DESCRIPTION, formatter_class=fmt)
    verbs = convert.add_subparsers(dest="convert_command", metavar="VERB")
    convert.set_defaults(func=lambda args: (convert.print_help(), 2)[1])

    p = verbs.add_parser("pth_to_hf", help="training checkpoint → HF adapter or model",
                         description=PTH_TO_HF_DESCRIPTION, formatter_class=fmt)
    p.add_argument("config", metavar="CFG", help="the training config file (for checkpoints without tunelab.json)")
    _add_to_hf_arguments(p)

    p = verbs.add_parser("to-hf", help="the same as pth_to_hf, config optional",
                         description=PTH_TO_HF_DESCRIPTION, formatter_class=fmt)
    p.add_argument("--config", metavar="CFG", help="the training config file (optional)")
    _add_to_hf_arguments(p)

    p = verbs.add_parser("merge", help="base model + adapter → one HF model with the training chat_template",
                         description=MERGE_DESCRIPTION, formatter_class=fmt)
    p.add_argument("base", metavar="BASE", help="the base model the adapter was trained on: a hub id, a directory, "
                                                "or a full fine-tuning run's WORK_DIR or iter_N")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory, iter_N checkpoint or WORK_DIR")
    p.add_argument("out", metavar="OUT", help="directory to write the merged model to")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    p.add_argument("--device", default="auto", help="where to merge: auto (GPU if any), cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the merged model (auto: the base's own)")
    p.add_argument("--prompt-template", "--template", metavar="NAME", dest="prompt_template",
                   help="override the template recorded in tunelab.json (--template: LLaMA-Factory's spelling)")
    p.add_argument("--format", dest="output_format", default="hf", choices=["hf", "original"],
                   help="hf (default) or original (InternLM2's own layout, for InternLM2 bases)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the base repository's own code")
    p.add_argument("--allow-other-base", action="store_true",
                   help="merge although the adapter was trained on a base of another architecture")
    p.set_defaults(func=merge_cmd)
    _register_gguf(verbs, fmt)
    _register_xtuner(verbs, fmt)


def _register_gguf(verbs, fmt) -> None:
    p = verbs.add_parser("gguf", help="HF model (or base + adapter) → GGUF file + Ollama Modelfile",
                         description=GGUF_DESCRIPTION, formatter_class=fmt)
    p.add_argument("model", metavar="MODEL", help="a merged model directory, a WORK_DIR or iter_N checkpoint, or the "
                                                  "base model with --adapter")
    p.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write (its folder gets the Modelfile)")
    p.add_argument("--type", dest="out_type", default="f16", metavar="TYPE",
                   help="how weights are stored: f16 (default), bf16, f32, q8_0 (about half of f16), or q6_k, "
                        "q5_k_m, q4_k_m (about 30%%), q4_0 quantised by llama.cpp through llama-cpp-python")
    p.add_argument("--adapter", metavar="DIR", help="an adapter directory, iter_N checkpoint or WORK_DIR to merge in")
    p.add_argument("--prompt-template", "--template", metavar="NAME", dest="prompt_template",
                   help="override the template recorded in tunelab.json (--template: LLaMA-Factory's spelling)")
    p.add_argument("--no-modelfile", action="store_true", help="write only the GGUF file")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--allow-other-base", action="store_true",
                   help="merge --adapter although it was trained on a base of another architecture")
    p.set_defaults(func=gguf_cmd)


XTUNER_DESCRIPTION = """\
Write a tunelab config equivalent to an XTuner (mmengine) config, without running it (no mmengine or XTuner
needed): model and method (full / LoRA / QLoRA from the model dict), data_path and data_format (from the dataset
and its dataset_map_fn), prompt_template, SYSTEM, max_length, packing, batch, learning rate and schedule, epochs,
saving and evaluation settings. The new file's header lists what did not carry over and what works differently.
A DeepSpeed strategy in the file becomes a preset; otherwise DeepSpeed stays a command-line flag, as in
XTuner: tunelab train OUT --deepspeed zero2. Step counts become optimiser steps (XTuner counts micro-batches).

example:
  tunelab convert xtuner-config internlm2_chat_1_8b_qlora_alpaca_e3.py my_config.py
  tunelab check-dataset my_config.py
  tunelab train my_config.py --work-dir work_dirs/run1
"""


def _register_xtuner(verbs, fmt) -> None:
    p = verbs.add_parser("xtuner-config", help="an XTuner config → an equivalent tunelab config",
                         description=XTUNER_DESCRIPTION, formatter_class=fmt)
    p.add_argument("source", metavar="IN", help="the XTuner config (.py)")
    p.add_argument("dest", metavar="OUT", help="the tunelab config to write (.py)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=xtuner_config_cmd)


def xtuner_config_cmd(args) -> int:
    from tunelab.config.xtuner_convert import convert

    path, migration = convert(args.source, args.dest, force=args.force)
    print(f"wrote {path}")
    for line in migration.not_carried:
        print(f"  not carried over: {line}")
    print(f"next: read its header, then\n  tunelab check-dataset {path}\n  tunelab train {path} --work-dir "
          f"work_dirs/{path.stem}")
    return 0


def _add_to_hf_arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="an iter_N directory or a WORK_DIR")
    p.add_argument("out", metavar="OUT", help="directory to write the HF adapter / model to")
    p.add_argument("--fp32", action="store_true", help="save weights in fp32 (default bf16)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    p.set_defaults(func=pth_to_hf_cmd)


def pth_to_hf_cmd(args) -> int:
    from tunelab.export.convert import pth_to_hf

    pth_to_hf(args.config, args.checkpoint, args.out, fp32=args.fp32, max_shard_size=args.max_shard_size)
    return 0


def merge_cmd(args) -> int:
    from tunelab.export.convert import merge

    merge(args.base, args.adapter, args.out, max_shard_size=args.max_shard_size, device=args.device,
          dtype=args.dtype, prompt_template=args.prompt_template, output_format=args.output_format,
          trust_remote_code=args.trust_remote_code, allow_other_base=args.allow_other_base)
    return 0


def gguf_cmd(args) -> int:
    from tunelab.errors import TunelabError

    try:
        import gguf  # noqa: F401  (llama.cpp's own GGUF writer)
    except ImportError:
        raise TunelabError("convert gguf needs the gguf package (llama.cpp's GGUF writer): pip install gguf "
                           "(or pip install 'tunelab[gguf]')") from None
    from tunelab.export.gguf_convert import convert_to_gguf

    convert_to_gguf(args.model, args.out, out_type=args.out_type, adapter=args.adapter,
                    prompt_template=args.prompt_template, modelfile=not args.no_modelfile,
                    trust_remote_code=args.trust_remote_code, allow_other_base=args.allow_other_base)
    return 0
