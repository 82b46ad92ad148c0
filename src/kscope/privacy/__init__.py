"""PrivacyParaRel: make private facts, inject them, locate and erase them, measure the erasure."""
