from lensray.cli.main import main

raise SystemExit(main())
