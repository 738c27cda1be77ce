"""`python -m experiments.figures SWEEP_DIR`: regenerate a sweep's figures (experiments.analysis.figures)."""

from experiments.analysis.figures import main

if __name__ == "__main__":
    main()
