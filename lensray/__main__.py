from lensray.cli import main

raise SystemExit(main())
