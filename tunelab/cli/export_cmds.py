"""`tunelab convert pth_to_hf | to-hf | merge`: from a training checkpoint to HF files (XTuner's verb names)."""

from __future__ import annotations

import argparse

CONVERT_DESCRIPTION = """\
Turn a training checkpoint into files other tools read.

  pth_to_hf CFG CKPT OUT   checkpoint → HF adapter (LoRA / QLoRA) or HF model (full fine-tuning)
  to-hf CKPT OUT           the same, the config being optional (tunelab.json in the checkpoint says it all)
  merge BASE ADAPTER OUT   base + adapter → one HF model whose chat_template is the training template
  xtuner-config IN OUT     an XTuner (mmengine) config → an equivalent tunelab config

example:
  tunelab convert pth_to_hf my_config.py work_dirs/run1/iter_500 hf_adapter
  tunelab convert merge internlm/internlm2-chat-1_8b hf_adapter merged
  tunelab chat merged
"""

PTH_TO_HF_DESCRIPTION = """\
Convert a training checkpoint to a HF directory: a peft adapter (adapter_config.json + adapter_model.safetensors,
loadable with peft.PeftModel.from_pretrained) for LoRA / QLoRA, a full model for full fine-tuning.
CKPT is an iter_N directory, or a WORK_DIR (its last checkpoint is used). tunelab.json and the tokenizer are copied
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
ADAPTER is an adapter directory (from pth_to_hf), an iter_N checkpoint or a WORK_DIR.

example:
  tunelab convert merge internlm/internlm2-chat-1_8b hf_adapter merged
  tunelab convert merge Qwen/Qwen2.5-0.5B-Instruct work_dirs/run1 merged --dtype bf16 --device cpu
  tunelab chat merged
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
    p.add_argument("base", metavar="BASE", help="the base model (hub id or directory) the adapter was trained on")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory, iter_N checkpoint or WORK_DIR")
    p.add_argument("out", metavar="OUT", help="directory to write the merged model to")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    p.add_argument("--device", default="auto", help="where to merge: auto (GPU if any), cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the merged model (auto: the base's own)")
    p.add_argument("--prompt-template", metavar="NAME", help="override the template recorded in tunelab.json")
    p.add_argument("--format", dest="output_format", default="hf", choices=["hf", "original"],
                   help="hf (default) or original (InternLM2's own layout, for InternLM2 bases)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the base repository's own code")
    p.set_defaults(func=merge_cmd)
    _register_xtuner(verbs, fmt)


XTUNER_DESCRIPTION = """\
Write a tunelab config equivalent to an XTuner (mmengine) config, without running it (no mmengine or XTuner
needed): model and method (full / LoRA / QLoRA from the model dict), data_path and data_format (from the dataset
and its dataset_map_fn), prompt_template, SYSTEM, max_length, packing, batch, learning rate and schedule, epochs,
saving and evaluation settings. The new file's header lists what did not carry over and what works differently.
DeepSpeed stays a command-line flag, as in XTuner: tunelab train OUT --deepspeed zero2.

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
          trust_remote_code=args.trust_remote_code)
    return 0
