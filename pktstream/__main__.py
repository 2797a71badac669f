from pktstream.cli import run

run()
