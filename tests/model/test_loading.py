import torch


def test_model_fingerprint_ignores_the_thread_count_and_sees_a_changed_weight():
    from tests.helpers import tiny_llama
    from kscope.model.loading import model_fingerprint

    model = tiny_llama(vocab_size=20000)
    with torch.no_grad():  # a big tensor summing to ~0: its float32 sum's leading digits depend on the reduction order
        w = torch.randn_like(model.model.embed_tokens.weight) * 1e3
        model.model.embed_tokens.weight.copy_(w - w.mean())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model_fingerprint(model)
        torch.set_num_threads(2)
        two = model_fingerprint(model)
    finally:
        torch.set_num_threads(threads)
    assert one == two and torch.get_num_threads() == threads
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] += 1.0
    assert model_fingerprint(model) != one
