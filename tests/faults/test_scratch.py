import os, signal, time
from conftest import png_bytes, wait_until
from faults.helpers import runs, unacked_tags

def test_redis_restart(start_worker, endless_model, fault_redis, producer_process):
    r = fault_redis()
    lim = dict(broker_url=r.url, time_limit=10, soft_time_limit=9, visibility_timeout=12)
    w = start_worker(model=endless_model, max_tasks_per_child=2, **lim)
    p = producer_process(**lim)
    c = r.client()
    long = p.submit(seed=1, max_new_tokens=800)
    queued = [p.submit(seed=2+i) for i in range(4)]
    assert wait_until(lambda: runs(c, long) == 1, 60)
    time.sleep(1.0)
    r.restart()
    t0 = time.monotonic()
    for q in queued:
        print(p.call("result", job_id=q, timeout=120)["ok"], time.monotonic()-t0)
    for i in range(30):
        print(time.monotonic()-t0, p.call("state", job_id=long), runs(c, long), unacked_tags(c))
        if p.call("state", job_id=long)["state"] == "SUCCESS": break
        time.sleep(5)
    print(w.log()[-8000:])
    c.close()
