"""The private facts and the models that learn them: PrivacyParaRel, the injection fine-tune and its retain twin."""
