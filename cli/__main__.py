from clips4.cli import run

run()
