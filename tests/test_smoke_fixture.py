from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo_platform.logprobs import batch_response_logprobs, response_logprobs


def test_tiny_model_loads_and_batched_logprobs_match(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[1, 5, 9, 11], [1, 7]]
    responses = [[20, 21, 2], [30, 31, 32, 33, 2]]
    single = [response_logprobs(model, p, r) for p, r in zip(prompts, responses)]
    batched = batch_response_logprobs(model, prompts, responses, pad_id=tok.pad_token_id)
    for a, b in zip(single, batched):
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-5
