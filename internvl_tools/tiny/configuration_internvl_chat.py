"""A minimal `InternVLChatConfig` for generated (make-tiny) original-layout checkpoints: test use only.

Real InternVL checkpoints ship their own `configuration_internvl_chat.py` (remote code), which
vLLM reads with trust_remote_code. Generated checkpoints carry no remote code, and neither
transformers nor vLLM knows `model_type: internvl_chat`, so vLLM could not load them.
`tiny.generator.add_config_module(folder)` copies this file into a checkpoint folder and points
config.json's `auto_map` at it. It only turns config.json into config objects: `vision_config`
into a config with the same attributes, `llm_config` into transformers' config of its model_type
(a plain config with the same attributes for InternLM2 / InternLM3, which transformers lacks).
This file is copied on its own: it imports nothing from internvl_tools.
"""

from transformers import AutoConfig, PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    """InternViT's settings, as config.json's `vision_config` states them."""

    model_type = "intern_vit_6b"

    def __init__(self, **kwargs):
        kwargs.setdefault("num_channels", 3)
        kwargs.setdefault("hidden_act", "gelu")
        kwargs.setdefault("drop_path_rate", 0.0)
        kwargs.setdefault("initializer_factor", 1.0)
        super().__init__(**kwargs)


class RemoteLLMConfig(PretrainedConfig):
    """An LLM config transformers has no class for (InternLM2, InternLM3): its fields as attributes."""

    model_type = "internlm2"


def llm_config_of(values: dict) -> PretrainedConfig:
    """The config object of `llm_config`: transformers' own class for its model_type when it has one."""
    values = dict(values)
    model_type = values.pop("model_type", "llama")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (KeyError, ValueError):
        config = RemoteLLMConfig(**values)
        config.model_type = model_type
        return config


class InternVLChatConfig(PretrainedConfig):
    """config.json of the original (remote-code) layout: `vision_config`, `llm_config` and the
    image settings (select_layer, downsample_ratio, ps_version, template, tiling)."""

    model_type = "internvl_chat"

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0, use_llm_lora=0, select_layer=-1,
                 force_image_size=None, downsample_ratio=0.5, template=None, dynamic_image_size=False,
                 use_thumbnail=False, ps_version="v1", min_dynamic_patch=1, max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        self.vision_config = InternVisionConfig(**(vision_config or {}))
        self.llm_config = llm_config_of(llm_config or {"architectures": ["LlamaForCausalLM"]})
        self.use_backbone_lora, self.use_llm_lora = use_backbone_lora, use_llm_lora
        self.select_layer, self.force_image_size, self.downsample_ratio = select_layer, force_image_size, downsample_ratio
        self.template, self.ps_version = template, ps_version
        self.dynamic_image_size, self.use_thumbnail = dynamic_image_size, use_thumbnail
        self.min_dynamic_patch, self.max_dynamic_patch = min_dynamic_patch, max_dynamic_patch

    def get_text_config(self, *args, **kwargs):
        """The LLM's config (what vLLM sizes the KV cache and the decoder from); this config itself
        while __init__ has not set it yet."""
        return self.__dict__.get("llm_config", self)

    def to_dict(self):
        """config.json's shape: the sub-configs as dicts."""
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        return out
