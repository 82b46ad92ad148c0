"""Facts (subject, relation, object, paraphrase prompts): the record (``fact``), ParaRel and its paraphrase families
(``pararel``, ``families``), the built-in set and JSONL files (``sources``), the held-out split (``split``), and
answer-token resolution with the "does the model know it" filter (``known``). Every public name is importable from
``kscope.facts``."""

from kscope.facts.fact import Fact, read_jsonl
from kscope.facts.families import (TemplateFamilies, compute_families, family_sides, near_duplicate, template_families)
from kscope.facts.known import answer_token, context_length, filter_known, prepare_facts, resolve_targets
from kscope.facts.pararel import load_pararel, relation_templates, template_to_prompt, write_template_families
from kscope.facts.sources import (FactConfig, asking, builtin_facts, distinct, load_fact_file, load_facts, prune_prompts,
                                  write_fact_file)
from kscope.facts.split import (FamilySplit, family_split, first_prompts, holdout_option, split_kind, split_prompts,
                                splittable)

__all__ = [
    "Fact", "FactConfig", "FamilySplit", "TemplateFamilies", "answer_token", "asking", "builtin_facts", "compute_families",
    "context_length", "distinct", "family_sides", "family_split", "filter_known", "first_prompts", "holdout_option",
    "load_fact_file", "load_facts", "load_pararel", "near_duplicate", "prepare_facts", "prune_prompts", "read_jsonl",
    "relation_templates", "resolve_targets", "split_kind", "split_prompts", "splittable", "template_families",
    "template_to_prompt", "write_fact_file", "write_template_families",
]
