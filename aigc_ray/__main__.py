from aigc_ray.cli import main

raise SystemExit(main())
