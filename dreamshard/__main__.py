from dreamshard.cli import run

run()
