"""The InternVL chat templates as data (prompt format, stop token, the tokenizer's special
tokens), and image-token insertion.

Source: InternVL's `internvl_chat/internvl/conversation.py` (templates named by config.json's
`template`) and the tokenizers of the LLMs they pair with.
"""

from __future__ import annotations

from dataclasses import dataclass

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


@dataclass(frozen=True)
class Template:
    """A conversation format: system block, role prefixes, separator (also the stop token)."""

    system: str  # with {system_message}
    system_message: str
    user: str
    assistant: str
    sep: str
    stop: str
    special_tokens: tuple[str, ...] = ()  # the LLM tokenizer's own special tokens, in id order
    bos: str | None = None

    def prompt(self, question: str) -> str:
        """A single-turn prompt that ends where the assistant's answer starts."""
        if self.user == "USER":  # vicuna style: "SYSTEM USER: q ASSISTANT:"
            return f"{self.system.format(system_message=self.system_message)} USER: {question} ASSISTANT:"
        head = self.system.format(system_message=self.system_message) + self.sep if self.system_message else ""
        return f"{head}{self.user}{question}{self.sep}{self.assistant}"


TEMPLATES = {
    "Hermes-2": Template("<|im_start|>system\n{system_message}", INTERNVL2_SYSTEM, "<|im_start|>user\n",
                         "<|im_start|>assistant\n", "<|im_end|>", "<|im_end|>",
                         ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    "internvl2_5": Template("<|im_start|>system\n{system_message}", INTERNVL2_5_SYSTEM, "<|im_start|>user\n",
                            "<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>",
                            ("<|endoftext|>", "<|im_start|>", "<|im_end|>")),
    "internlm2-chat": Template("<|im_start|>system\n{system_message}", INTERNVL2_SYSTEM, "<|im_start|>user\n",
                               "<|im_start|>assistant\n", "<|im_end|>", "<|im_end|>",
                               ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                "<|interpreter|>", "<|plugin|>"), "<s>"),
    "phi3-chat": Template("<|system|>\n{system_message}", INTERNVL2_SYSTEM, "<|user|>\n", "<|assistant|>\n", "<|end|>", "<|end|>",
                          ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<s>"),
    "vicuna_v1.1": Template("{system_message}",
                            "A chat between a curious user and an artificial intelligence assistant. "
                            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
                            "USER", "ASSISTANT", " ", "</s>", ("<unk>", "<s>", "</s>"), "<s>"),
}


def get_template(name: str | None) -> Template:
    """The template config.json's `template` names.

    Raises LayoutError for a missing or unknown name, listing the supported ones (never a
    guess: a wrong template silently degrades every answer)."""
    from ..errors import LayoutError

    if name not in TEMPLATES:
        raise LayoutError(f"config.json: template {name!r} is not a supported chat template; supported: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def image_placeholder(tokens_per_tile: int, num_tiles: int) -> str:
    """<img> + <IMG_CONTEXT> x (tokens per tile x tiles) + </img>."""
    return IMG_START + IMG_CONTEXT * (tokens_per_tile * num_tiles) + IMG_END


def build_prompt(template_name: str, question: str, tokens_per_tile: int = 0, num_tiles: int = 0) -> str:
    """The full prompt text; the image goes first, on its own line, as the model cards do."""
    if num_tiles:
        question = image_placeholder(tokens_per_tile, num_tiles) + "\n" + question
    return get_template(template_name).prompt(question)
