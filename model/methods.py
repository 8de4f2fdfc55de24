"""The method registry: every value `method` may take, and what each one needs, in one place.

    model = build_model(cfg, n_items, llm_embeddings, pca, train_popularity)
    METHODS["llminit"].needs_llm_table(cfg)   # does the run need the LLM item table?

Each method lives in its own module: a model that subclasses SequentialRecommender and
overrides what it changes, and, if it has hyper-parameters of its own, a settings dataclass
with `rule(...)` bounds. Those settings join the one flat namespace as "<method>.<field>"
(`--set rlmrec_con.weight=0.1`, a search-space param `rlmrec_con.weight`), are validated by
model.config's one validator, and are an error in a run of another method. FAERec's own
settings (tau, alpha, lambda, ...) keep their plain names in FAERecConfig.
How to add a method: the README's Methods section.
"""

from dataclasses import dataclass
from typing import Callable

from model.config import METHOD_SETTINGS, FAERecConfig
from model.alphafuse import AlphaFuse, AlphaFuseConfig
from model.cities import CITIESConfig, build_cities
from model.faerec import FAERec, SequentialRecommender
from model.llmesr import LLMESRConfig, build_llmesr
from model.llminit import LLMInit
from model.melt import MELTConfig, build_melt
from model.rlmrec import RLMRecCon, RLMRecConConfig, RLMRecGen, RLMRecGenConfig


@dataclass(frozen=True)
class Method:
    # (cfg, n_items, llm (n_items, d_llm) | None, pca (n_items, d) | None, popularity (n_items + 1,)) -> model
    build: Callable
    about: str                                 # one line: --help, the README
    settings: type | None = None               # its own settings dataclass, "<method>.<field>"
    needs_llm: bool = False                    # the model reads the LLM item table
    needs_pca: Callable[[FAERecConfig], bool] = lambda cfg: False  # ...the table reduced to d by PCA
    needs_data: bool = False                   # build also gets the SequenceData (training sequences)

    def needs_llm_table(self, cfg: FAERecConfig) -> bool:
        return self.needs_llm or self.needs_pca(cfg)


METHODS: dict[str, Method] = {
    "faerec": Method(FAERec, "FAERec: gated ID + LLM fusion, item- and feature-level alignment",
                     needs_llm=True, needs_pca=lambda cfg: cfg.pca_init),
    "base": Method(lambda cfg, n_items, *_: SequentialRecommender(cfg, n_items),
                   "the backbone alone on random ID embeddings"),
    "llminit": Method(lambda cfg, n_items, llm, pca, pop: LLMInit(cfg, n_items, pca),
                      "ID table initialised from the PCA-reduced LLM table, then plain training",
                      needs_pca=lambda cfg: True),
    "alphafuse": Method(lambda cfg, n_items, llm, *_: AlphaFuse(cfg, n_items, llm),
                        "ID embeddings learnt in the null space of the whitened LLM table (SVD), no adapter",
                        settings=AlphaFuseConfig, needs_llm=True),
    "rlmrec_con": Method(lambda cfg, n_items, llm, *_: RLMRecCon(cfg, n_items, llm),
                         "BCE + InfoNCE between ID item embeddings and the LLM table mapped down",
                         settings=RLMRecConConfig, needs_llm=True),
    "rlmrec_gen": Method(lambda cfg, n_items, llm, *_: RLMRecGen(cfg, n_items, llm),
                         "BCE + masked positions' outputs mapped up must pick out their items' LLM embeddings",
                         settings=RLMRecGenConfig, needs_llm=True),
    "llmesr": Method(build_llmesr, "LLM-ESR: ID view + adapted frozen-LLM view through the backbone, "
                                   "self-distillation from similar users", settings=LLMESRConfig,
                     needs_llm=True, needs_pca=lambda cfg: cfg.method_settings.pca_init, needs_data=True),
    "cities": Method(build_cities, "CITIES: the backbone, then tail-item embeddings inferred from their contexts "
                                   "by a function trained on head items", settings=CITIESConfig, needs_data=True),
    "melt": Method(build_melt, "MELT: user and item branches (W_U, W_I) transfer from head to tail users "
                               "and items, curriculum-weighted", settings=MELTConfig, needs_data=True),
}
METHOD_SETTINGS.update({name: m.settings for name, m in METHODS.items()})  # model.config validates them


def build_model(cfg: FAERecConfig, n_items: int, llm_embeddings=None, pca=None, train_popularity=None,
                data=None):
    """The model `cfg.method` names. llm_embeddings (n_items, d_llm), pca (n_items, d),
    train_popularity (n_items + 1,), data (SequenceData): each needed only by the methods that read it."""
    method = METHODS[cfg.method]
    if method.needs_llm and llm_embeddings is None:
        raise ValueError(f"method {cfg.method!r} needs llm_embeddings")
    if method.needs_data:
        if data is None:
            raise ValueError(f"method {cfg.method!r} needs the training sequences (data)")
        return method.build(cfg, n_items, llm_embeddings, pca, train_popularity, data)
    return method.build(cfg, n_items, llm_embeddings, pca, train_popularity)
