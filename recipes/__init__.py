"""TRL recipes that train chain-of-thought reasoning into the Llama 4 models of this package."""
