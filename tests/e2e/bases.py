"""Prints the base image of every stack, for `make e2e` to make them locally."""

from components.render import read_stack_file
from components.settings import parse
from tests.program import PROJECT_DIR

if __name__ == "__main__":
    bases = {parse(stack, read_stack_file(PROJECT_DIR, stack)).images.base for stack in ("dev", "prod")}
    print("\n".join(sorted(bases)))
