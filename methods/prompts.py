"""Prompt parameters and prompt building shared by DAAM, Attn2Mask, OVAM, the baselines and `compare`."""

from __future__ import annotations

from collections.abc import Mapping

from methods.base import ClassQuery, Param

PROMPT_PARAMS = {
    "prompt": Param("caption", "inversion prompt: caption (the dataset's caption, the template when there is "
                    "none) or template; generation always uses the dataset's generation prompt", kind="forward",
                    choices=("caption", "template")),
    "template": Param("A photograph of a {classes}", "prompt template; {classes} = class names joined by ' and '",
                      kind="forward", fields=("classes",), examples=("{classes}", "a photo of the {classes}.")),
    "attribution": Param("A photograph of a {name}", "attribution prompt for classes absent from the prompt "
                         "({name}: class name, {prompt}: the generation prompt)",
                         fields=("name", "prompt"), examples=("a {name}", "{prompt}, a {name}")),
    "open_vocab": Param(True, "record queries so classes absent from the prompt get attribution maps; False "
                        "records cross-attention only (absent classes then fail)"),
    "tokens": Param(None, "optimised-token file from bench.optimize_tokens (OVAM Table 2; classes it holds use "
                    "their [background, class] tokens), or auto (fitted on the training split by the fit stage)",
                    type=str, nullable=True, kind="train", examples=("auto",)),
}


def build_prompt(query: ClassQuery, caption: str | None, cfg: Mapping) -> str:
    if cfg["prompt"] == "caption" and caption:
        return caption
    return cfg["template"].format(classes=" and ".join(query.names))
