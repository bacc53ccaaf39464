import pytest

from kornia_siglip2 import SigLip2Config, TextConfig, VisionConfig


class TestSigLip2Config:
    def test_minimal_hub_config_takes_transformers_defaults(self):
        config = SigLip2Config.from_hf_dict({"model_type": "siglip"})
        assert config.text_config == TextConfig(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=64,
            projection_size=768,
            layer_norm_eps=1e-6,
            hidden_act="gelu_pytorch_tanh",
        )
        vision = config.vision_config
        assert (vision.hidden_size, vision.patch_size, vision.image_size, vision.vision_use_head) == (
            768,
            16,
            224,
            True,
        )
        assert SigLip2Config.from_hf_dict({"model_type": "siglip2"}).vision_config.num_patches == 256

    def test_projection_size_defaults_to_hidden_size(self):
        assert TextConfig(hidden_size=1152).projection_size == 1152
        assert TextConfig(hidden_size=1152, projection_size=1024).projection_size == 1024

    @pytest.mark.parametrize("model_type", ["siglip", "siglip2"])
    def test_hf_dict_roundtrip(self, model_type):
        config = SigLip2Config(
            model_type, VisionConfig(hidden_size=64, num_attention_heads=4), TextConfig(vocab_size=7)
        )
        hf = config.to_hf_dict()
        assert hf["model_type"] == model_type and hf["vision_config"]["model_type"] == f"{model_type}_vision_model"
        assert ("num_patches" in hf["vision_config"]) == (model_type == "siglip2")
        assert SigLip2Config.from_hf_dict(hf) == config

    def test_transformers_reads_our_config(self):
        from transformers import AutoConfig

        for model_type in ("siglip", "siglip2"):
            hf = SigLip2Config(model_type).to_hf_dict()
            config = AutoConfig.for_model(**hf)
            assert config.model_type == model_type and config.text_config.vocab_size == 32000

    def test_exception(self):
        with pytest.raises(ValueError, match="Unknown model_type 'clip'"):
            SigLip2Config.from_hf_dict({"model_type": "clip"})
        with pytest.raises(ValueError, match="Unknown model_type None"):
            SigLip2Config.from_hf_dict({})
        with pytest.raises(ValueError, match="divisible by num_attention_heads"):
            VisionConfig(hidden_size=30, num_attention_heads=4)
        with pytest.raises(ValueError, match="perfect square"):
            SigLip2Config("siglip2", VisionConfig(num_patches=200))
        with pytest.raises(ValueError, match="image_size 8 must be at least patch_size 16"):
            SigLip2Config("siglip", VisionConfig(image_size=8))
        with pytest.raises(ValueError, match="hidden_act"):
            TextConfig(hidden_act="swish")
