"""Where a fact lives: attribution of its answer to units, ΔProb of editing them, the compare/locate jobs."""
