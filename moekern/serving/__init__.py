"""Serving moekern checkpoints on vLLM.

    plan.py         what each decoder layer of a checkpoint holds (experts stored, experts routed to, skip beta,
                    MoE removed) and moekern's routing as a vLLM custom routing function: plain torch, no vLLM
    vllm_models.py  the vLLM model classes of non-standard checkpoints, built from vLLM's own model files and
                    layers (imported only inside vLLM's processes)
    vllm_plugin.py  the `vllm.general_plugins` entry point that registers them
    server.py       `moekern serve DIR`: checks the folder and the port, then runs vLLM's OpenAI server from the
                    serving environment

The main environment never imports vLLM: only vllm_models.py and vllm_plugin.py do, and only vLLM loads them.
"""
