from mpirefine.cli import main

raise SystemExit(main())
