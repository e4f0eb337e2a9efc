"""moekern's vLLM classes for every family vLLM has: a small random model of each, with a different expert count in
one layer, masked experts and skip in another, a removed MoE and a removed block, served by `moekern serve`; its
greedy tokens equal moekern's own generate (float32). The models carry the shipped model's tokenizer (vLLM's
log-probabilities need one); prompts go as token ids."""

import pytest
import torch
from tiny_models import redraw_weights
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

import moekern
from moekern import surgery

# head_dim 64: a size vLLM's CPU attention kernels take
COMMON = dict(vocab_size=4096, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
              num_hidden_layers=6, bos_token_id=0, eos_token_id=None, pad_token_id=2, tie_word_embeddings=False)
# no EOS: both sides generate MAX_TOKENS argmax tokens
# DeepSeek's latent attention: vLLM's CPU kernel takes only kv_lora_rank + qk_rope_head_dim = 512 + 64
MLA = dict(num_key_value_heads=2, kv_lora_rank=512, q_lora_rank=96, qk_rope_head_dim=64, qk_nope_head_dim=64,
           v_head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
CONFIGS = {
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=64,
                                        shared_expert_intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                                        norm_topk_prob=False, mlp_only_layers=[1]),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=64, intermediate_size=96, moe_intermediate_size=64,
                                        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "olmoe": lambda: OlmoeConfig(**COMMON, intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                                 norm_topk_prob=False),
    "deepseek_v2": lambda: DeepseekV2Config(**{**COMMON, **MLA}, intermediate_size=96, moe_intermediate_size=64,
                                            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                            first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=2,
                                            topk_group=1, routed_scaling_factor=2.5),
    "deepseek_v3": lambda: DeepseekV3Config(**{**COMMON, **MLA}, intermediate_size=96, moe_intermediate_size=64,
                                            n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                                            first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
                                            routed_scaling_factor=1.5),
}
PROMPTS = [[5, 17, 33, 2, 61, 40, 7], [100, 200, 300, 400], [9, 8, 7, 6, 5, 4, 3, 2]]
MAX_TOKENS = 16


def random_model(family: str):
    torch.manual_seed(0)
    model = redraw_weights(AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32), 0.08)
    moe = surgery.moe_layer_ids(model)
    surgery.drop_experts(model, {moe[0]: [0, 2, 3, 5, 6]})  # a different count
    surgery.drop_experts(model, {moe[1]: [1, 2, 4, 7]}, mask_only=True)  # masked
    surgery.set_skip_beta(model, {moe[1]: 0.4, moe[2]: 0.6})
    surgery.remove_moe_layers(model, [moe[3]])
    surgery.remove_blocks(model, [moe[-1]])
    return model


def save(model, folder):
    from moekern.shipped import MODEL_DIR
    from transformers import AutoTokenizer

    moekern.save(model, folder, tokenizer=AutoTokenizer.from_pretrained(MODEL_DIR))


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_each_family_serves_as_moekern_generates(family, tmp_path, serve):
    save(random_model(family), tmp_path / "model")
    model, _ = moekern.load(tmp_path / "model", dtype=torch.float32)
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():  # every prompt token attended (HF would mask tokens equal to the pad id)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
        expected.append(out[0, len(prompt):].tolist())
    server = serve(tmp_path / "model")
    server.wait_ready()
    served = server.complete(PROMPTS, MAX_TOKENS, ignore_eos=True)
    assert served == expected


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_first_position_logprobs_equal_moekerns(family, tmp_path, serve):
    """DeepSeek at the first position of one-token prompts. vLLM's CPU latent attention (MLA) and transformers'
    disagree beyond the first position on these models even with nothing compressed (log-probabilities up to ~0.4
    apart from position 1 on, equal at position 0), which is vLLM's attention, not moekern's plugin: at position 0
    attention is exact, and what the plugin builds (expert counts, removed MoE, masked experts, skip, groups and the
    correction bias over the original experts, the routed scaling) decides the output."""
    save(random_model(family), tmp_path / "model")
    model, _ = moekern.load(tmp_path / "model", dtype=torch.float32)
    tokens = list(range(3, 4000, 97))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor(tokens)[:, None]).logits[:, 0].float(), dim=-1)
    server = serve(tmp_path / "model")
    server.wait_ready()
    choices = server.completions([[t] for t in tokens], 1, ignore_eos=True, logprobs=1)
    served = [c["token_ids"][0] for c in choices]
    assert served == logprobs.argmax(-1).tolist()
    served_logprobs = torch.tensor([c["logprobs"]["token_logprobs"][0] for c in choices])
    torch.testing.assert_close(served_logprobs, logprobs.max(-1).values, rtol=0, atol=1e-4)
