"""The agent's receipt book: answers kept on disk across restarts, in seq order, forgotten once
the validator pulled past them (or after keep_s), whatever job they belong to."""

from __future__ import annotations

import time

from cluster.miner.receipt_book import ReceiptBook


def keep(book: ReceiptBook, job: str, seq: int) -> None:
    book.keep(job, f"{job}-{seq}", receipt={"body": {"seq": seq, "request_id": f"{job}-{seq}"}},
              request=b"q%d" % seq, response=b"a%d" % seq, envelope=b"e", client_sig="00")


def test_kept_answers_survive_a_restart_and_go_once_pulled(tmp_path):
    book = ReceiptBook(tmp_path / "receipts.db")
    for seq in (2, 0, 1, 3):
        keep(book, "j1", seq)
    keep(book, "j2", 0)
    book.close()
    book = ReceiptBook(tmp_path / "receipts.db")  # the agent restarted
    assert book.jobs() == {"j1", "j2"}
    page = book.page("j1", after_seq=-1, limit=3)
    assert [k["receipt"]["body"]["seq"] for k in page] == [0, 1, 2] and page[1]["response"] == b"a1"
    assert book.receipt("j1", "j1-3") == {"body": {"seq": 3, "request_id": "j1-3"}}
    assert [k["receipt"]["body"]["seq"] for k in book.page("j1", after_seq=2, limit=3)] == [3]
    assert book.count("j1") == 1 and book.count("j2") == 1  # up to seq 2 pulled: gone; other jobs untouched
    assert book.page("j1", after_seq=3, limit=3) == [] and book.count("j1") == 0


def test_answers_nobody_pulled_go_after_keep_s(tmp_path):
    book = ReceiptBook(tmp_path / "receipts.db", keep_s=0.05)
    keep(book, "j1", 0)
    time.sleep(0.1)
    keep(book, "j1", 1)  # every write forgets what is older than keep_s
    assert [k["receipt"]["body"]["seq"] for k in book.page("j1", after_seq=-1, limit=10)] == [1]
