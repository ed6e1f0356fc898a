"""Run inside .venv-proc (torch + torchvision) by tests/test_processor.py: a `convert --to hf` folder
used as it is by transformers' AutoProcessor and AutoModelForImageTextToText.

    python processor_check.py JOB.json RESULT.json

JOB: {"cases": [{"name", "native", "image", "question", "max_new_tokens", "transpose"}]}. For each
case and each image-processor backend ("torchvision": the default and what vLLM uses; "pil":
`use_fast=False`): AutoProcessor -> apply_chat_template -> processor(images, text) -> greedy
generate with the folder's own generation_config. pixel_values are saved next to RESULT as
`{name}-{backend}.pt` for the caller to compare with the runtime's. Cases with "transpose" (ps_version
v1) get pixel_values.transpose(-1, -2), and are run again with the image transposed before the
processor instead (`{name}-pretransposed-{backend}.pt`): what a vLLM user can do. Imports nothing
of the project.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path


def run_case(case: dict, out_dir: Path) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    image = Image.open(case["image"]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": case["question"]}]}]
    model = AutoModelForImageTextToText.from_pretrained(case["native"], dtype=torch.float32, attn_implementation="eager")
    result = {"model_class": type(model).__name__}
    for backend, kwargs in (("torchvision", {}), ("pil", {"use_fast": False})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor = AutoProcessor.from_pretrained(case["native"], **kwargs)
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=text, return_tensors="pt")
        pixels = inputs["pixel_values"]
        torch.save(pixels, out_dir / f"{case['name']}-{backend}.pt")
        if case.get("transpose"):
            inputs["pixel_values"] = pixels.transpose(-1, -2)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=case["max_new_tokens"], do_sample=False)
        result[backend] = {
            "processor": type(processor).__name__,
            "image_processor": type(processor.image_processor).__name__,
            "tokenizer": type(processor.tokenizer).__name__,
            "image_seq_length": processor.image_seq_length,
            "text": text,
            "input_ids": inputs["input_ids"][0].tolist(),
            "tokens": output[0, inputs["input_ids"].shape[1]:].tolist(),
        }
    if case.get("transpose"):  # the vLLM recipe: the image transposed before the processor
        for backend, kwargs in (("torchvision", {}), ("pil", {"use_fast": False})):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                processor = AutoProcessor.from_pretrained(case["native"], **kwargs)
            transposed = processor(images=[image.transpose(Image.Transpose.TRANSPOSE)], text=text, return_tensors="pt")
            torch.save(transposed["pixel_values"], out_dir / f"{case['name']}-pretransposed-{backend}.pt")
            with torch.no_grad():
                output = model.generate(**transposed, max_new_tokens=case["max_new_tokens"], do_sample=False)
            result[backend]["pretransposed_tokens"] = output[0, transposed["input_ids"].shape[1]:].tolist()
    return result


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    results = {case["name"]: run_case(case, out.parent) for case in job["cases"]}
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
