"""Ray's own output in the driver goes to the run's log file, not to the terminal: its loggers'
records during ray.init (which clears the ``ray`` logger's handlers) and after, and the messages
the cluster pushes to the driver, of which only those that are not warnings also reach stderr."""

from __future__ import annotations

import logging

import ray._private.worker as worker

from lensray.run.callbacks import ray_output_to


def test_ray_records_and_pushed_messages_go_to_the_file(tmp_path, capsys):
    ray_log = logging.getLogger("ray")
    saved = (list(ray_log.handlers), ray_log.propagate, worker.print_to_stdstream, logging.lastResort)
    path = tmp_path / "ray.log"
    try:
        with ray_output_to(str(path)):
            ray_log.handlers.clear()  # as ray.init does first
            logging.getLogger("ray._private.authentication.x").warning("Token authentication is enabled")
            logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
            elsewhere = logging.getLogger("lensray-test-elsewhere")
            elsewhere.propagate = False  # no handler on its way: Python's last resort
            elsewhere.warning("not Ray's")
        logging.getLogger("ray.tune").warning("after start-up")
        worker.print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes have been started"], "pid": "raylet",
                                   "is_err": False}, ignore_prefix=False)
        worker.print_to_stdstream({"lines": ["The node with node id: abc has been marked dead\nmore"], "pid": "raylet",
                                   "is_err": False}, ignore_prefix=False)
        assert ray_log.handlers == [h for h in ray_log.handlers if getattr(h, "_lensray", False)] and ray_log.handlers
        for handler in ray_log.handlers:
            handler.flush()
        out, err = capsys.readouterr()
        text = path.read_text()
    finally:
        for handler in ray_log.handlers:
            handler.close()
        ray_log.handlers[:] = saved[0]
        ray_log.propagate, worker.print_to_stdstream, logging.lastResort = saved[1], saved[2], saved[3]
    for line in ("Token authentication is enabled", "Started a local Ray instance.", "after start-up",
                 "(raylet) WARNING: 8 PYTHON worker processes", "(raylet) The node with node id: abc"):
        assert line in text
    assert "not Ray's" not in text and "not Ray's" in err  # other loggers' last resort is untouched
    assert out == ""
    assert err.count("\n") == 2 and "ray: The node with node id: abc has been marked dead more (more in" in err
    assert "Token" not in err and "PYTHON worker" not in err and "Started" not in err
